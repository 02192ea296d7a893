"""The process owner: uvicorn with sluice's drain on SIGTERM and exit on engine failure.

uvicorn's own SIGTERM handling closes the listening socket at once, so new clients would get
"connection refused" instead of a 503 with `Retry-After`, and a load balancer could not tell
draining from dead. Here the first SIGTERM (or SIGINT) only starts the lifecycle's drain:
`/readyz` turns 503, new generation requests get 503, in-flight ones finish (up to
`drain_timeout_s`); then uvicorn shuts down normally and the process exits 0. A second
SIGINT forces an immediate exit. When the engine dies, the process exits 1 so that a
supervisor restarts it. Whatever the phase (loading, serving, draining), a stop ends the
process: the model loads in a daemon thread (engine/base.py), the processes of a load cut
short are stopped, and the interpreter's own exit gets `EXIT_DEADLINE_S`: its exit hooks run,
and the process ends without the module teardown (`end_process`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import resource
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

import uvicorn
from fastapi import FastAPI

from sluice.config import LimitSettings
from sluice.connections import guarded_protocol
from sluice.lifecycle import Lifecycle

logger = logging.getLogger(__name__)

# Time for in-flight error responses to reach clients before a dead engine ends the process.
FAILURE_FLUSH_S = 1.0
# After the drain, what uvicorn still allows connections before cutting them.
CUT_OFF_S = 2.0
# Once serving has ended, what the interpreter's own exit (atexit hooks, thread joins) may
# take before the process ends regardless: a stop must never hang on a library's clean-up.
EXIT_DEADLINE_S = 10.0
# File descriptors kept for the engine, the stores and logs beside client connections.
RESERVED_FILES = 512


class SluiceServer(uvicorn.Server):
    """`uvicorn.Server` that drains before it stops and reports the lifecycle's exit code."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain_requested = False
        self._ending: asyncio.Task[None] | None = None

    @property
    def lifecycle(self) -> Lifecycle | None:
        return getattr(self.app.state, "lifecycle", None)

    @property
    def exit_code(self) -> int:
        lifecycle = self.lifecycle
        return lifecycle.exit_code if lifecycle is not None else 1

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested and sig == signal.SIGINT:
            self.force_exit = True
            self.should_exit = True
            return
        if self.lifecycle is None:  # before start-up finished: nothing to drain
            self.should_exit = True
            return
        self._drain_requested = True  # acted on in on_tick, inside the event loop

    async def on_tick(self, counter: int) -> bool:
        lifecycle = self.lifecycle
        if lifecycle is not None and self._ending is None:
            if lifecycle.exit_requested.is_set():
                self._ending = asyncio.create_task(self._end_after_failure())
            elif self._drain_requested:
                self._ending = asyncio.create_task(self._drain_then_exit(lifecycle))
        return await super().on_tick(counter)

    async def _drain_then_exit(self, lifecycle: Lifecycle) -> None:
        await lifecycle.drain(self.drain_timeout_s)
        self.should_exit = True

    async def _end_after_failure(self) -> None:
        await asyncio.sleep(FAILURE_FLUSH_S)
        self.should_exit = True


def run(
    app: FastAPI,
    host: str,
    port: int,
    drain_timeout_s: float,
    log_level: str,
    limits: LimitSettings | None = None,
) -> int:
    """Serve `app` until drained or failed, with the connection `limits` (connections.py);
    returns the process exit code."""
    limits = limits or LimitSettings()
    allow_open_files(limits.max_connections + RESERVED_FILES)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(CUT_OFF_S),
        lifespan="on",
        log_config=None,  # sluice's logging (telemetry/logging.py) is already configured
        access_log=False,  # one line per request, sluice's own (telemetry/logging.py)
        http=guarded_protocol(
            limits.headers_timeout_s, limits.body_timeout_s, limits.max_connections
        ),
    )
    server = SluiceServer(config, app, drain_timeout_s)
    server.run()
    code = server.exit_code if server.started else 1
    exit_by_deadline(code)
    return code


def end_process(code: int) -> NoReturn:
    """End the process with `code` once serving has ended (the app's shutdown is done): the
    exit hooks run (`atexit`, bounded by `exit_by_deadline`), logs are flushed, and the
    process ends without the interpreter's module teardown. That teardown is where the
    native modules vLLM imports report their objects still alive (triton's nanobind bindings
    print dozens of "leaked" lines on every stop) and it took 2.5 s here; nothing of sluice's
    is left for it to do."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files towards `wanted` (up to the hard limit),
    as `vllm serve` does: each connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "open-file limit %d is below limits.max_connections plus %d for the engine; "
            "raise it (ulimit -n) or lower max_connections",
            soft,
            RESERVED_FILES,
        )


def exit_by_deadline(code: int, deadline_s: float = EXIT_DEADLINE_S) -> None:
    """End the process with `code` after `deadline_s` if it has not ended by then (a daemon
    timer, so a normal exit is not delayed)."""

    def force() -> None:
        logger.error("the process did not end within %.0fs of stopping; forcing exit", deadline_s)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(deadline_s, force)
    timer.daemon = True
    timer.start()
