"""A real `sluice serve` process for end-to-end tests (vLLM's `RemoteOpenAIServer` pattern),
or another server's (vLLM's own, as an upstream).

Starts `python -m sluice serve` on a free loopback port, waits for `/readyz`, and stops it
with SIGTERM. Its output goes to a log file that failing tests print.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from sluice.bench.compare import free_port, wait_until_ok

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0


class SluiceProcess:
    """One server process; `url` is its base URL, `api` its `/v1` base."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        command: list[str] | None = None,
        ready_path: str = "/readyz",
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        """`python -m sluice serve --port PORT *args`, or `command` followed by `--port
        PORT` (another server, e.g. vLLM's; ready when `ready_path` answers 200), in
        `base_env` (this process's environment by default) updated with `env`."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/v1"
        self.log_path = log_path
        self.ready_path = ready_path
        self.name = "sluice" if command is None else " ".join(command[1:3])
        self._log = log_path.open("ab")
        sluice = [sys.executable, "-m", "sluice", "serve"]
        self.proc = subprocess.Popen(
            [*(command or sluice), "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**(base_env or os.environ), "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        if not wait_until_ok(f"{self.url}{self.ready_path}", START_TIMEOUT_S, self.proc):
            state = (
                f"exited with {self.proc.returncode}"
                if self.proc.poll() is not None
                else (f"was not ready in {START_TIMEOUT_S}s")
            )
            raise RuntimeError(f"{self.name} {state}:\n{self.log()}")

    def engine_stats(self) -> dict[str, float]:
        body = httpx.get(f"{self.url}/readyz", timeout=5).json()
        stats: dict[str, float] = body["engine"]
        return {**stats, "in_flight": body["in_flight"]}

    def wait_idle(self, timeout_s: float = 15.0) -> dict[str, float]:
        """Poll until nothing runs or waits in the engine; returns the last stats."""
        deadline = time.monotonic() + timeout_s
        stats = self.engine_stats()
        while time.monotonic() < deadline:
            stats = self.engine_stats()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["in_flight"] == 0:
                return stats
            time.sleep(0.2)
        return stats

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-6000:]
