"""Side-by-side comparisons of servers started here as local processes (the scripts in
`benchmarks/` and the end-to-end tests use it).

Each target is started once and stays up; `compare` then hands them all to `sluice bench`,
which runs the same load against them in turns (A B A B …), so drift on a noisy machine hits
every target alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from sluice.bench.load import bearer

START_TIMEOUT_S = 300.0
# The load the serving comparisons default to (arguments of `sluice bench`).
SERVING_LOAD = ["--concurrency", "16", "--requests", "48", "--max-tokens", "64", "--rounds", "3"]


# The environment vLLM's own server runs with beside sluice on a CPU: what sluice sets for its
# engine (app.py's PROCESS_ENV and KV cache) and offline, as for the packaged model.
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


class OtlpSink:
    """A local OTLP/HTTP trace receiver that accepts every export, counts it and drops it,
    serving in a daemon thread from construction on; `url` is its traces endpoint."""

    def __init__(self) -> None:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.exports += 1
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.exports = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"


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
def running(targets: list[Target], log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start every target, wait until each lists its models, yield their processes (in the
    order of `targets`), stop them all at the end."""
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
        yield processes
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


BENCH_ADMIN = "bench-admin"


@contextmanager
def gateway_on_redis(work: Path) -> Iterator[dict[str, str]]:
    """A throwaway `redis-server` on a free port; yields the environment of a sluice with the
    whole gateway on it (Redis store, admin API, prices for the USD budget)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        cwd=work,
    )
    try:
        yield {
            "SLUICE_GATEWAY__STORE": "redis",
            "SLUICE_GATEWAY__REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "SLUICE_GATEWAY__ADMIN_KEY": BENCH_ADMIN,
            "SLUICE_PRICING__DEFAULT__INPUT_USD_PER_MTOK": "0.5",
            "SLUICE_PRICING__DEFAULT__OUTPUT_USD_PER_MTOK": "1.5",
        }
    finally:
        redis.terminate()
        redis.wait(10)


def bench_key(api: str) -> str:
    """A new key with limits and budgets far above any benchmark (so every check runs and
    none refuses), created through the admin API of the server at `api`."""
    response = httpx.post(
        f"{api.removesuffix('/v1')}/admin/keys",
        json={
            "name": "bench",
            "rpm": 100_000_000,
            "tpm": 1_000_000_000,
            "budget_tokens": 1_000_000_000,
            "budget_usd": 1_000_000,
        },
        headers=bearer(BENCH_ADMIN),
    )
    response.raise_for_status()
    secret: str = response.json()["secret"]
    return secret


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
