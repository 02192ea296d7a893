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
from collections.abc import Callable

from sluice.errors import Draining, EngineDead, ModelLoading

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 10.0
DRAINING_RETRY_AFTER_S = 5.0
# After a drain times out: how long the requests it cut off have to answer and settle
# before the server stops (and cancels whatever still runs).
CUT_OFF_GRACE_S = 2.0


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
        self._on_cut_off: set[Callable[[], None]] = set()

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

    def on_cut_off(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` if a drain times out while the request that registered it still
        runs (it ends the request with `cut_off_error`); returns the unregistering call."""
        self._on_cut_off.add(callback)
        return lambda: self._on_cut_off.discard(callback)

    @staticmethod
    def cut_off_error() -> Draining:
        return Draining(
            "The server is shutting down and its drain time ran out before this request "
            "finished. Retry on another replica.",
            retry_after_s=DRAINING_RETRY_AFTER_S,
        )

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for in-flight requests; True if all finished in time.
        Past `timeout_s` the requests still running are cut off (`on_cut_off`): each answers
        with `cut_off_error` (a 503, or an error event in a stream) and settles, within
        `CUT_OFF_GRACE_S`."""
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
            for cut in list(self._on_cut_off):
                cut()
            try:
                await asyncio.wait_for(self._idle.wait(), CUT_OFF_GRACE_S)
            except TimeoutError:
                logger.error(
                    "%d request(s) did not end within %.0fs of being cut off",
                    self.in_flight,
                    CUT_OFF_GRACE_S,
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
