"""`FrontendEngine`: what both engines share — a vLLM `AsyncLLM` front end (engine/frontend.py)
built from the namespace of vLLM's own `vllm serve` parser, and the scheduler snapshot that
`stats()` reads. `VllmEngine` and `SyntheticEngine` differ only in the engine core below it.

vLLM is imported only when an engine starts, so `sluice --help` and the settings checks stay
fast.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from typing import Any

from sluice.engine.protocol import EngineStats


class FrontendEngine:
    """The shared half of the `Engine` protocol (see module docstring); subclasses implement
    `start` (which sets `_llm` and `_snapshot`), `shutdown` and `check_health`."""

    def __init__(self, args: Namespace) -> None:
        self._args = args
        self._llm: Any = None  # ObservedAsyncLLM once started
        self._snapshot: Any = None  # frontend.SchedulerSnapshot once started

    @property
    def args(self) -> Namespace:
        return self._args

    @property
    def served_model_names(self) -> list[str]:
        """`--served-model-name` values, else the model as given (vLLM's rule)."""
        names: list[str] = self._args.served_model_name or [self._args.model]
        return names

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def client(self) -> Any:
        return self._llm

    async def _vllm_config(self) -> Any:
        """vLLM's `VllmConfig` for `args`, built as `vllm serve` builds it, in a worker
        thread (importing model code and resolving the config block for seconds)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext

        def config() -> Any:
            engine_args = AsyncEngineArgs.from_cli_args(self._args)
            return engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)

        return await asyncio.to_thread(config)

    def stats(self) -> EngineStats:
        if self._llm is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        from sluice.engine.frontend import engine_stats

        return engine_stats(self._llm, self._snapshot)
