"""`SyntheticEngine`: vLLM's real front end over an engine core that makes filler tokens on a
timer, with no weights and no accelerator.

Never the default; chosen with `sluice serve --engine synthetic`. It exists to measure
sluice's own process (HTTP, the gateway, vLLM's serving layer, tokenising, detokenising,
SSE, metrics, tracing) at token rates a CPU-bound model cannot reach. Everything above the
engine core is the code that serves the real model: the chat template, the tokenizer, vLLM's
request validation, its output processor (stop strings, detokenisation, merging the tokens a
slow reader missed into one delta) and its OpenAI layer. Only sampling is fake: each running
sequence gets one filler token every `1 / tokens_per_s` seconds (all running sequences step
together, as in continuous batching) until `max_tokens`; `max_num_seqs` caps the running
ones and the rest wait, as in a real scheduler. Structured-output constraints do not apply
to filler text. The model folder provides the tokenizer and config only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice.engine.base import FrontendEngine
from sluice.engine.protocol import EngineFailure

logger = logging.getLogger(__name__)

# Ten words that are one token each in common tokenizers (SmolLM2's, GPT-2's).
FILLER_TEXT = " one two three four five six seven eight nine ten"
# What a synthetic logprob looks like: the sampled token and `k` alternatives below it.
SAMPLED_LOGPROB = -0.5


@dataclass
class SyntheticSequence:
    """One engine request the synthetic core is running."""

    request: Any  # vllm.v1.engine.EngineCoreRequest
    made: int = 0


class _Resources:
    engine_dead = False


class SyntheticCore:
    """Stands in for vLLM's engine-core client (`vllm.v1.engine.core_client`): takes
    `EngineCoreRequest`s, returns `EngineCoreOutputs` one engine step at a time."""

    engine_ranks_managed = (0,)

    def __init__(self, tokens_per_s: float, max_num_seqs: int | None = None) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
        from vllm.v1.metrics.stats import SchedulerStats

        self._types = (EngineCoreOutput, EngineCoreOutputs, FinishReason, SchedulerStats)
        self.step_s = 1.0 / tokens_per_s
        self.max_num_seqs = max_num_seqs
        self.filler_ids: Sequence[int] = (0,)
        self.resources = _Resources()
        self.running: dict[str, SyntheticSequence] = {}
        self.waiting: dict[str, SyntheticSequence] = {}
        self.loras: set[int] = set()
        self._wake = asyncio.Event()
        self._next_step = 0.0
        self._report_idle = False  # aborts emptied the core: tell the front end once

    # -- what AsyncLLM calls -------------------------------------------------------------
    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_request_async(self, request: Any) -> None:
        self.waiting[request.request_id] = SyntheticSequence(request)
        self._schedule()
        self._wake.set()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.running.pop(request_id, None)
            self.waiting.pop(request_id, None)
        self._schedule()
        if not self.running:
            self._report_idle = True
            self._wake.set()

    async def get_output_async(self) -> Any:
        """The next engine step's outputs, on the clock (waits while nothing runs)."""
        engine_core_output, engine_core_outputs, _, scheduler_stats = self._types
        while not self.running:
            if self._report_idle:  # as vLLM's core steps once more after aborts
                self._report_idle = False
                idle = scheduler_stats(num_running_reqs=0, num_waiting_reqs=len(self.waiting))
                return engine_core_outputs(outputs=[], scheduler_stats=idle)
            self._wake.clear()
            await self._wake.wait()
            self._next_step = time.monotonic() + self.step_s
        # Sleep to the schedule rather than a fixed amount, so step overhead cannot drift.
        await asyncio.sleep(max(0.0, self._next_step - time.monotonic()))
        self._next_step = max(self._next_step + self.step_s, time.monotonic() - self.step_s)
        if self.resources.engine_dead:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError()
        outputs = [self.step(sequence, engine_core_output) for sequence in self.running.values()]
        for output in outputs:
            if output.finish_reason is not None:
                del self.running[output.request_id]
        self._schedule()
        stats = scheduler_stats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting)
        )
        return engine_core_outputs(outputs=outputs, scheduler_stats=stats)

    async def add_lora_async(self, lora_request: Any) -> bool:
        self.loras.add(lora_request.lora_int_id)
        return True

    async def remove_lora_async(self, lora_id: int) -> bool:
        self.loras.discard(lora_id)
        return True

    async def list_loras_async(self) -> set[int]:
        return set(self.loras)

    async def pin_lora_async(self, lora_id: int) -> bool:
        return lora_id in self.loras

    def shutdown(self, timeout: float | None = None) -> None:
        self.running.clear()
        self.waiting.clear()

    # -- the fake sampler -----------------------------------------------------------------
    def next_token(self, sequence: SyntheticSequence) -> int:
        """The token `sequence` samples next: filler words, shifted by the prompt (so equal
        prompts get equal answers, as greedy sampling would)."""
        offset = sum(sequence.request.prompt_token_ids or ())
        return self.filler_ids[(sequence.made + offset) % len(self.filler_ids)]

    def step(self, sequence: SyntheticSequence, output_type: Any) -> Any:
        """One token for `sequence`, with its finish reason when it is done."""
        _, _, finish_reason, _ = self._types
        params = sequence.request.sampling_params
        token = self.next_token(sequence)
        sequence.made += 1
        reason = None
        stop_reason = None
        ignored = params.ignore_eos and token == params.eos_token_id
        if (
            token in params.all_stop_token_ids
            and sequence.made >= params.min_tokens
            and not ignored
        ):
            reason = finish_reason.STOP
            stop_reason = token if token in params.stop_token_ids else None
        if reason is None and sequence.made >= (params.max_tokens or 1):
            reason = finish_reason.LENGTH
        prompt_logprobs = None
        if sequence.made == 1 and params.prompt_logprobs is not None:
            prompt = list(sequence.request.prompt_token_ids or ())
            prompt_logprobs = _prompt_logprobs(prompt, params.prompt_logprobs, self.filler_ids)
        return output_type(
            request_id=sequence.request.request_id,
            new_token_ids=[token],
            new_logprobs=_logprobs(token, params.logprobs, self.filler_ids),
            new_prompt_logprobs_tensors=prompt_logprobs,
            finish_reason=reason,
            stop_reason=stop_reason,
        )

    def _schedule(self) -> None:
        while self.waiting and (self.max_num_seqs is None or len(self.running) < self.max_num_seqs):
            request_id, sequence = next(iter(self.waiting.items()))
            del self.waiting[request_id]
            self.running[request_id] = sequence


def _logprobs(token: int, count: int | None, filler: Sequence[int]) -> Any:
    """vLLM's per-step logprobs rows for one sampled token: itself, then `count` others."""
    if count is None:
        return None
    import numpy as np
    from vllm.v1.outputs import LogprobsLists

    others = [t for t in filler if t != token][: max(count, 0)]
    ids = [token, *others]
    logprobs = [SAMPLED_LOGPROB - i for i in range(len(ids))]
    return LogprobsLists(
        np.array([ids], dtype=np.int64),
        np.array([logprobs], dtype=np.float32),
        np.array([0], dtype=np.int64),
    )


def _prompt_logprobs(prompt: Sequence[int], count: int, filler: Sequence[int]) -> Any:
    """vLLM's prompt logprobs tensors (what `echo` with `logprobs` and `prompt_logprobs`
    read): one row per prompt token after the first (vLLM gives the first token no logprob),
    the token itself, then `count` others (`-1`, the whole vocabulary, is the filler words)."""
    import torch
    from vllm.v1.outputs import LogprobsTensors

    others = list(filler) if count < 0 else list(filler)[:count]
    rows = [[token, *others] for token in prompt[1:]]
    width = 1 + len(others)
    return LogprobsTensors(
        torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width),
        torch.tensor([[SAMPLED_LOGPROB - i for i in range(width)]] * len(rows)).reshape(
            len(rows), width
        ),
        torch.ones(len(rows), dtype=torch.int64),
    )


class SyntheticEngine(FrontendEngine):
    """The `Engine` protocol over `SyntheticCore` (see module docstring)."""

    def __init__(
        self, args: Namespace, tokens_per_s: float, core: SyntheticCore | None = None
    ) -> None:
        super().__init__(args)
        self.core = core or SyntheticCore(tokens_per_s, args.max_num_seqs)

    async def start(self) -> None:
        from sluice.engine.frontend import build_llm

        vllm_config = await self._vllm_config()
        llm, self._snapshot = build_llm(vllm_config, core=self.core, default_loggers=False)
        tokenizer = llm.renderer.get_tokenizer()
        self.core.filler_ids = tuple(tokenizer.encode(FILLER_TEXT, add_special_tokens=False))
        self._llm = llm

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    async def check_health(self) -> None:
        if self.core.resources.engine_dead:
            raise EngineFailure("the synthetic engine core was stopped")
