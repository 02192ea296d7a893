"""vLLM's front end as both engines build it: an `ObservedAsyncLLM` with sluice's scheduler
snapshot, over vLLM's own engine core (child processes) or one given (the synthetic core).

`AsyncLLM.__init__` creates its engine-core client through
`EngineCoreClient.make_async_mp_client`; to give it another core, that factory is replaced
for the duration of the constructor call only (vLLM offers no other seam; the pin on
vllm 0.32 covers it and tests/api prove the synthetic core still plugs in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vllm.config import VllmConfig
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.core_client import EngineCoreClient
from vllm.v1.executor import Executor
from vllm.v1.metrics.loggers import StatLoggerBase

from sluice.engine.observed import ObservedAsyncLLM
from sluice.engine.protocol import EngineStats


class SchedulerSnapshot(StatLoggerBase):  # type: ignore[misc]
    """A vLLM stat logger that keeps the latest scheduler figures (running, waiting,
    KV-cache usage); vLLM calls `record` after every engine step."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self.latest = EngineStats(running=0, waiting=0, kv_cache_usage=0.0)

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.latest = EngineStats(
                running=scheduler_stats.num_running_reqs,
                waiting=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=float(scheduler_stats.kv_cache_usage),
            )

    def log_engine_initialized(self) -> None:
        pass


@contextlib.contextmanager
def _engine_core(core: Any) -> Iterator[None]:
    original = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda **_: core)
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = original


def build_llm(
    vllm_config: VllmConfig,
    *,
    core: Any = None,
    default_loggers: bool = True,
) -> tuple[ObservedAsyncLLM, SchedulerSnapshot]:
    """An `ObservedAsyncLLM` on `vllm_config` and the snapshot of its scheduler figures.

    `core=None` starts vLLM's engine core processes; otherwise `core` serves as the engine
    core. `default_loggers` adds vLLM's own Prometheus and log stat loggers (the `vllm:*`
    metrics), which register process-wide families: one such engine per process.
    """
    snapshots: list[SchedulerSnapshot] = []

    def snapshot_logger(config: Any, engine_index: int = 0) -> SchedulerSnapshot:
        snapshot = SchedulerSnapshot(config, engine_index)
        snapshots.append(snapshot)
        return snapshot

    with contextlib.ExitStack() as stack:
        if core is not None:
            stack.enter_context(_engine_core(core))
        llm = ObservedAsyncLLM(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config) if core is None else Executor,
            log_stats=default_loggers,
            log_requests=False,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[snapshot_logger],
        )
    return llm, snapshots[0]
