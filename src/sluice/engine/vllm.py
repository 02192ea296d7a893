"""`VllmEngine`: the Engine protocol over vLLM's in-process `AsyncLLM`.

vLLM brings the paged KV cache, continuous batching and its engine core in child processes;
this class builds the engine exactly as `vllm serve` does (`AsyncEngineArgs.from_cli_args`
on the namespace of vLLM's own argument parser, engine/args.py), in a daemon thread so the
event loop keeps answering `/healthz` and `/readyz` while the model loads and a SIGTERM
mid-load ends the process at once, and reports vLLM's failures as ours (`EngineFailure` when
the engine core is dead).
"""

from __future__ import annotations

import gc
import logging
import time

from sluice.engine.base import FrontendEngine, in_daemon_thread, stop_child_processes
from sluice.engine.protocol import EngineFailure

logger = logging.getLogger(__name__)


class VllmEngine(FrontendEngine):
    """One model served by vLLM's `AsyncLLM` in this process (engine core in child processes)."""

    async def start(self) -> None:
        from sluice.engine.frontend import build_llm

        started = time.monotonic()
        vllm_config = await self._vllm_config()
        # The engine core processes start and load the model meanwhile.
        llm, self._snapshot = await in_daemon_thread(lambda: build_llm(vllm_config))
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
        """Stop the engine; before it is up (a stop mid-load), stop the processes the load
        started instead (the load's thread is a daemon and does not hold the process)."""
        llm, self._llm = self._llm, None
        if llm is None:
            stop_child_processes()
        else:
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
