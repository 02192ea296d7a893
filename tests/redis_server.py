"""A real `redis-server` for tests: a free port, its own directory, restartable on its data.

Append-only persistence is on and RDB snapshots off, so `stop()` then `start()` (same port,
same directory) brings back every write the server acknowledged, as a restarted Redis would.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from sluice.bench.compare import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def redis_available() -> bool:
    """True when Debian's (or any) `redis-server` is on PATH."""
    return shutil.which("redis-server") is not None


class RedisServer:
    """One `redis-server --daemonize no` process on 127.0.0.1, started by `start()`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.log_path = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    def start(self) -> None:
        """Start the server (again, on the same port and data) and wait until it answers."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited on start:\n{self.log()}")
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as client:
                    if client.ping():
                        return
            except redis.RedisError:
                pass  # not listening yet, or still loading its append-only file
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file) and wait; SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)  # in case a test paused it
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: a crash, without a clean shutdown."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
