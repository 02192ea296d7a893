"""Side-by-side comparisons of servers started here as local processes (the scripts in
`benchmarks/` and the end-to-end tests use it).

Each target is started once and stays up; `compare` then hands them all to `sluice bench`,
which runs the same load against them in turns (A B A B …), so drift on a noisy machine hits
every target alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

START_TIMEOUT_S = 300.0
# The load the serving comparisons default to (arguments of `sluice bench`).
SERVING_LOAD = ["--concurrency", "16", "--requests", "48", "--max-tokens", "64", "--rounds", "3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Target:
    """A server to start: `command` must make it listen on `port`."""

    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextmanager
def running(targets: list[Target], log_dir: Path) -> Iterator[None]:
    """Start every target, wait until each lists its models, stop them all at the end."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for target in targets:
            log = (log_dir / f"{target.name}.log").open("wb")
            process = subprocess.Popen(
                target.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **target.env},
            )
            processes.append(process)
            _wait_up(target, process, log_dir)
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_ok(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    interval_s: float = 0.5,
) -> bool:
    """Poll `url` until it answers 200 (True), `timeout_s` passes or `process` exits (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return False


def _wait_up(target: Target, process: subprocess.Popen[bytes], log_dir: Path) -> None:
    if not wait_until_ok(f"{target.api}/models", START_TIMEOUT_S, process):
        raise SystemExit(f"{target.name} did not start; see {log_dir / target.name}.log")


def synthetic_server(port: int, tokens_per_s: int = 2000) -> list[str]:
    """The command of a quiet sluice process on the synthetic engine."""
    return [
        sys.executable,
        "-m",
        "sluice",
        "serve",
        "--port",
        str(port),
        "--engine",
        "synthetic",
        "--synthetic-tokens-per-s",
        str(tokens_per_s),
        "--log-level",
        "warning",
    ]


def compare(targets: list[Target], bench_argv: list[str]) -> int:
    """Start `targets`, then run `sluice bench` on all of them in turns with `bench_argv`
    (load, sweep, rounds, objective, --out …); returns its exit code."""
    from sluice.cli import main as sluice_main

    log_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    print(f"server logs in {log_dir}", flush=True)
    urls = [arg for t in targets for arg in ("--url", f"{t.name}={t.api}")]
    with running(targets, log_dir):
        return sluice_main(["bench", *urls, *bench_argv])
