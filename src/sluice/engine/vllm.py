"""`VllmEngine`: the Engine protocol over vLLM's in-process `AsyncLLM`.

The only module that imports vLLM (lazily, inside `start`, so importing sluice stays cheap).
vLLM brings the paged KV cache and continuous batching; this adapter translates our frozen
request types into `SamplingParams`, vLLM's delta outputs into `Delta`s, and vLLM's failures
into ours (`EngineFailure` when the engine core is dead, `InvalidRequest` for values vLLM
refuses). On CPU it sets the environment vLLM needs (DESIGN.md) unless the user already did.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from sluice.config import Settings
from sluice.engine.protocol import (
    Delta,
    EngineFailure,
    EngineStats,
    GenerationRequest,
    ModelCard,
    SamplingOptions,
    TokenLogprob,
)
from sluice.errors import InternalError, InvalidRequest

logger = logging.getLogger(__name__)

# Set before vLLM is imported, only where the user has not set them.
PROCESS_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
CPU_DEFAULT_KV_CACHE_GIB = 1.0
GIB = 1 << 30


def _apply_process_env() -> None:
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)


class _SchedulerStatsLogger:
    """Keeps vLLM's latest scheduler snapshot (running, waiting, KV-cache usage)."""

    latest: tuple[int, int, float] = (0, 0, 0.0)

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            type(self).latest = (
                scheduler_stats.num_running_reqs,
                scheduler_stats.num_waiting_reqs,
                float(scheduler_stats.kv_cache_usage),
            )

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass


class VllmEngine:
    """One model served by vLLM's `AsyncLLM` in this process (engine core in child processes)."""

    def __init__(self, settings: Settings) -> None:
        if settings.model is None:
            raise ValueError("VllmEngine needs a concrete model (the CLI resolves the default)")
        self.settings = settings
        self.model = settings.model
        self.served_name = settings.served_model_name or Path(settings.model).name
        self._llm: Any = None
        self._tokenizer: Any = None
        self._card: ModelCard | None = None
        self._stats_logger: type[_SchedulerStatsLogger] | None = None
        self._vllm: Any = None  # the handful of vLLM names we use, bound at start

    @property
    def ready(self) -> bool:
        return self._llm is not None

    async def start(self) -> None:
        # Importing vLLM and building AsyncLLM block for 30-50 s (processes spawn, the model
        # loads); a worker thread keeps the event loop free to answer /healthz and /readyz.
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        _apply_process_env()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import tokens_input
        from vllm.platforms import current_platform
        from vllm.sampling_params import (
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
        from vllm.v1.metrics.loggers import StatLoggerBase

        on_cpu = bool(current_platform.is_cpu())
        options = self.settings.engine
        kv_gib = options.kv_cache_gib
        if on_cpu:
            kv_gib = kv_gib or CPU_DEFAULT_KV_CACHE_GIB
            # vLLM's CPU backend reads the KV-cache size from this variable, over engine args;
            # its default asks for more than the NUMA node reports and start-up fails.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_gib)))
        args = AsyncEngineArgs(
            model=self.model,
            served_model_name=self.served_name,
            dtype=("float32" if on_cpu else "auto") if options.dtype == "auto" else options.dtype,
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            enable_prefix_caching=options.enable_prefix_caching,
            enforce_eager=on_cpu if options.enforce_eager is None else options.enforce_eager,
            gpu_memory_utilization=options.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_gib * GIB) if kv_gib else None,
            tensor_parallel_size=options.tensor_parallel_size,
            seed=options.seed,
            scheduling_policy=options.scheduling_policy,
            disable_log_stats=False,
        )
        stats_logger = type("SchedulerStatsLogger", (_SchedulerStatsLogger, StatLoggerBase), {})
        self._vllm = {
            "SamplingParams": SamplingParams,
            "DELTA": RequestOutputKind.DELTA,
            "StructuredOutputsParams": StructuredOutputsParams,
            "tokens_input": tokens_input,
            "EngineDeadError": EngineDeadError,
            "VLLMValidationError": VLLMValidationError,
        }
        started = time.monotonic()
        llm = AsyncLLM.from_engine_args(
            args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[stats_logger]
        )
        self._tokenizer = llm.get_tokenizer()
        self._card = ModelCard(
            id=self.served_name,
            max_model_len=int(llm.model_config.max_model_len),
            created=int(time.time()),
        )
        self._stats_logger = stats_logger
        self._llm = llm
        logger.info(
            "vLLM engine up in %.1fs: model=%s dtype=%s max_model_len=%d kv_cache=%s GiB "
            "platform=%s",
            time.monotonic() - started,
            self.model,
            args.dtype,
            self._card.max_model_len,
            kv_gib if kv_gib else f"{options.gpu_memory_utilization:.0%} of GPU",
            "cpu" if on_cpu else current_platform.device_name,
        )

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # Let AsyncLLM.__del__ run now, not during interpreter teardown (where it fails).
            del llm
            gc.collect()

    async def check_health(self) -> None:
        if self._llm is None:
            return
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineFailure(f"vLLM engine is dead: {exc}") from exc

    def model_card(self) -> ModelCard:
        if self._card is None:
            raise RuntimeError("engine not started")
        return self._card

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        rendered: str = self._tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return rendered

    def _sampling_params(self, options: SamplingOptions) -> Any:
        structured = None
        if options.structured is not None:
            make = self._vllm["StructuredOutputsParams"]
            structured = (
                make(json_object=True)
                if options.structured.json_schema is None
                else make(json=options.structured.json_schema)
            )
        return self._vllm["SamplingParams"](
            n=options.n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=list(options.stop) or None,
            seed=options.seed,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            logprobs=options.logprobs,
            structured_outputs=structured,
            output_kind=self._vllm["DELTA"],
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if self._llm is None:
            raise EngineFailure("engine not started")
        dead = self._vllm["EngineDeadError"]
        invalid = self._vllm["VLLMValidationError"]
        want_logprobs = request.sampling.logprobs
        try:
            params = self._sampling_params(request.sampling)
            stream = self._llm.generate(
                self._vllm["tokens_input"](list(request.prompt_token_ids)),
                params,
                request.request_id,
                priority=request.priority,
            )
            queue_s: float | None = None
            async for output in stream:
                if queue_s is None:
                    queue_s = _queue_seconds(output)
                    first_queue_s = queue_s
                else:
                    first_queue_s = None
                for choice in output.outputs:
                    yield Delta(
                        index=choice.index,
                        text=choice.text,
                        token_count=len(choice.token_ids),
                        finish_reason=_finish_reason(choice.finish_reason),
                        logprobs=(
                            _logprobs(choice.logprobs, want_logprobs)
                            if want_logprobs is not None and choice.logprobs
                            else ()
                        ),
                        queue_s=first_queue_s,
                    )
        except dead as exc:
            raise EngineFailure(f"vLLM engine died: {exc}") from exc
        except invalid as exc:
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        if self._llm is None or self._stats_logger is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        if self._llm.get_num_unfinished_requests() == 0:
            # Nothing in flight in the frontend: the engine core holds nothing either.
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        running, waiting, usage = self._stats_logger.latest
        return EngineStats(running=running, waiting=waiting, kv_cache_usage=usage)


def _queue_seconds(output: Any) -> float | None:
    """Engine-core queue time of a request, once it has been scheduled."""
    stats = getattr(output, "metrics", None)
    if stats is None or not stats.scheduled_ts or not stats.queued_ts:
        return None
    return max(0.0, float(stats.scheduled_ts - stats.queued_ts))


def _finish_reason(reason: str | None) -> Any:
    if reason is None:
        return None
    if reason in ("stop", "length"):
        return reason
    if reason == "repetition":
        return "stop"
    if reason == "abort":
        raise InternalError("The engine aborted this request.")
    raise InternalError(f"The engine could not complete this request ({reason}).")


def _logprobs(items: list[dict[int, Any]], top_n: int) -> tuple[TokenLogprob, ...]:
    out = []
    for position in items:
        ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank else 1 << 30)
        # The sampled token is the entry vLLM lists first; alternatives are ranks 1..top_n.
        sampled = next(iter(position.values()))
        top = tuple((lp.decoded_token or "", float(lp.logprob)) for lp in ranked[:top_n])
        out.append(
            TokenLogprob(token=sampled.decoded_token or "", logprob=float(sampled.logprob), top=top)
        )
    return tuple(out)
