"""`VllmEngine`: the Engine protocol over vLLM's in-process `AsyncLLM`.

vLLM brings the paged KV cache, continuous batching and its engine core in child processes;
this class builds the engine exactly as `vllm serve` does (`AsyncEngineArgs.from_cli_args`
on the namespace of vLLM's own argument parser, engine/args.py), in a worker thread so the
event loop keeps answering `/healthz` and `/readyz` while the model loads, and reports vLLM's
failures as ours (`EngineFailure` when the engine core is dead).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from argparse import Namespace
from typing import Any

from sluice.engine.protocol import EngineFailure, EngineStats

logger = logging.getLogger(__name__)


class VllmEngine:
    """One model served by vLLM's `AsyncLLM` in this process (engine core in child processes)."""

    def __init__(self, args: Namespace) -> None:
        self._args = args
        self._llm: Any = None
        self._snapshot: Any = None

    @property
    def args(self) -> Namespace:
        return self._args

    @property
    def served_model_names(self) -> list[str]:
        names: list[str] = self._args.served_model_name or [self._args.model]
        return names

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def client(self) -> Any:
        return self._llm

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext

        from sluice.engine.frontend import build_llm

        started = time.monotonic()

        def config() -> Any:
            engine_args = AsyncEngineArgs.from_cli_args(self._args)
            return engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)

        # Importing vLLM's model code and resolving the config block for seconds.
        vllm_config = await asyncio.to_thread(config)
        # AsyncLLM must be built on the event loop's thread (it starts its output handler
        # there); the engine core processes start and load the model meanwhile.
        llm, self._snapshot = await asyncio.to_thread(build_llm, vllm_config)
        llm._run_output_handler()
        self._llm = llm
        model_config = vllm_config.model_config
        logger.info(
            "vLLM engine up in %.1fs: model=%s dtype=%s max_model_len=%d",
            time.monotonic() - started,
            model_config.model,
            model_config.dtype,
            model_config.max_model_len,
        )

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ shuts down again; let it run now (a no-op after shutdown)
            # rather than during interpreter teardown, where it fails.
            del llm
            gc.collect()

    async def check_health(self) -> None:
        if self._llm is None:
            return
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineFailure(f"vLLM engine is dead: {exc}") from exc

    def stats(self) -> EngineStats:
        if self._llm is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        from sluice.engine.frontend import engine_stats

        return engine_stats(self._llm, self._snapshot)
