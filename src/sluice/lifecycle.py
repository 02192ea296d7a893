"""Server lifecycle: loading → ready → draining → stopped, or dead when the engine fails.

One `Lifecycle` lives on `app.state`. Routes ask it to `admit` generation work (it refuses
while loading, draining or dead), `/readyz` reads its phase, SIGTERM starts `drain`, and an
engine failure calls `fail`, which asks the process to exit non-zero. The process owner (the
CLI's uvicorn server) learns it should stop through `exit_requested`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from sluice.errors import Draining, EngineDead, ModelLoading

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 10.0
DRAINING_RETRY_AFTER_S = 5.0


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class Lifecycle:
    """Phase, in-flight request count, and the exit code the process should end with."""

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.in_flight = 0
        self.exit_code = 0
        self.load_seconds: float | None = None
        self.step = "starting"  # while loading: "pulling model", then "loading model"
        self.failure: str | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.exit_requested = asyncio.Event()

    def loaded(self, seconds: float) -> None:
        """The engine is up: start serving."""
        self.load_seconds = seconds
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def admit(self, needs_engine: bool = True) -> None:
        """Count one generation request in, or refuse it with the reason; a request an
        upstream serves (`needs_engine=False`) is taken while the engine loads."""
        if self.phase is Phase.LOADING and needs_engine:
            raise ModelLoading(
                "The model is still loading. Retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S
            )
        if self.phase is Phase.DRAINING:
            raise Draining(
                "The server is shutting down and takes no new requests. Retry on another replica.",
                retry_after_s=DRAINING_RETRY_AFTER_S,
            )
        if self.phase is Phase.DEAD:
            raise EngineDead(
                "The inference engine has failed and the server is restarting.",
                retry_after_s=LOADING_RETRY_AFTER_S,
            )
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        """Count one generation request out (always paired with a successful `admit`)."""
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for in-flight requests; True if all finished in time."""
        if self.phase in (Phase.READY, Phase.LOADING):
            self.phase = Phase.DRAINING
        started = time.monotonic()
        logger.info(
            "draining: %d request(s) in flight, waiting up to %.0fs", self.in_flight, timeout_s
        )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning(
                "drain timeout: %d request(s) still in flight are cut off", self.in_flight
            )
            return False
        logger.info("drained in %.1fs", time.monotonic() - started)
        return True

    def fail(self, reason: str) -> None:
        """The engine is gone: refuse everything and ask the process to exit non-zero."""
        if self.phase is Phase.DEAD:
            return
        logger.error("engine failure: %s; the process will exit", reason)
        self.phase = Phase.DEAD
        self.failure = reason
        self.exit_code = 1
        self.exit_requested.set()
