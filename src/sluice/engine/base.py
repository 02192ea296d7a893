"""`FrontendEngine`: what both engines share — a vLLM `AsyncLLM` front end (engine/frontend.py)
built from the namespace of vLLM's own `vllm serve` parser, and the scheduler snapshot that
`stats()` reads. `VllmEngine` and `SyntheticEngine` differ only in the engine core below it.

vLLM is imported only when an engine starts, so `sluice --help` and the settings checks stay
fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from argparse import Namespace
from collections.abc import Callable
from typing import Any, TypeVar

from sluice.engine.protocol import EngineStats

T = TypeVar("T")
logger = logging.getLogger(__name__)
# How long vLLM's processes get to end on SIGTERM when the server stops mid-load.
CHILD_STOP_S = 5.0


def freeze_startup_heap() -> None:
    """Move every object alive after start-up out of the garbage collector's sight, with
    vLLM's own `freeze_gc_heap` (what `vllm serve` calls once its server has started): a
    full collection then scans only what requests allocate. vLLM, torch and transformers
    leave some 700,000 objects; unfrozen, full collections took 0.35-0.40 s each, 2-3 times
    per 8 s at 250 requests/s (10-16% of the CPU, every request stalled meanwhile; the
    upstream proxy benchmark in docs/benchmarks.md). Once per process (tests build many
    apps in one)."""
    if gc.get_freeze_count():
        return
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    logger.debug("froze %d start-up objects out of garbage collection", gc.get_freeze_count())


async def in_daemon_thread(work: Callable[[], T], name: str = "sluice-load") -> T:
    """`work()` in a daemon thread, awaited. Unlike `asyncio.to_thread`, whose pool threads
    the interpreter joins at exit, a model load still running when the process is told to
    stop does not keep the process alive until the load ends."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled (the server is stopping)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def stop_child_processes(timeout_s: float = CHILD_STOP_S) -> None:
    """SIGTERM every process this one started (vLLM's engine core and its helpers), then
    SIGKILL those still alive after `timeout_s`: what a load cut short leaves behind."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if children:
        logger.info("stopped %d engine process(es) the interrupted load had started", len(children))


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

        return await in_daemon_thread(config)

    def stats(self) -> EngineStats:
        """The engine's own latest scheduler figures (those behind `vllm:num_requests_running`),
        not the front end's count: aborted requests run on until the engine core drops them."""
        if self._llm is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        latest: EngineStats = self._snapshot.latest
        return latest
