"""The cost of the gateway: the same load on sluice with keys, rate limits, budgets and the
Redis store on, against sluice with no keys (the open server), side by side in one run.

    .venv/bin/python benchmarks/gateway_overhead.py --rounds 3

Every argument goes to `sluice bench` (default load: 16 concurrent non-streaming chats of
16 output tokens, 2,000 requests per run, 3 rounds).

Both servers run the synthetic engine (fast, so the gateway's own cost is what shows) and
a real `redis-server` on a free port backs the gateway-on side. Each request is
authenticated, checked against RPM and TPM buckets and a token and USD budget in one Lua
call, and settled in another. Goal: at most 2 ms added at p50 per request and at most 5%
of throughput.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from sluice.bench.compare import Target, free_port, running, synthetic_server
from sluice.cli import main as sluice_main

MODEL = "synthetic"
ADMIN = "bench-admin"


LOAD = ["--no-stream", "--concurrency", "16", "--requests", "2000", "--max-tokens", "16"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sluice-gateway-bench-"))
    redis_port = free_port()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    redis = subprocess.Popen(
        [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        cwd=work,
    )
    on_port, off_port = free_port(), free_port()
    targets = [
        Target(
            "gateway-on",
            synthetic_server(on_port),
            on_port,
            {
                "SLUICE_GATEWAY__STORE": "redis",
                "SLUICE_GATEWAY__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "SLUICE_GATEWAY__ADMIN_KEY": ADMIN,
                "SLUICE_PRICING__DEFAULT__INPUT_USD_PER_MTOK": "0.5",
                "SLUICE_PRICING__DEFAULT__OUTPUT_USD_PER_MTOK": "1.5",
            },
        ),
        Target(
            "gateway-off", synthetic_server(off_port), off_port, {"SLUICE_CACHE_DIR": str(work)}
        ),
    ]
    try:
        with running(targets, work):
            key = httpx.post(
                f"http://127.0.0.1:{on_port}/admin/keys",
                json={
                    "name": "bench",
                    "rpm": 10_000_000,
                    "tpm": 1_000_000_000,
                    "budget_tokens": 1_000_000_000,
                    "budget_usd": 1_000_000,
                },
                headers={"Authorization": f"Bearer {ADMIN}"},
            ).json()["secret"]
            # The open server ignores the key; the gateway-on server checks it every time.
            code = sluice_main(
                [
                    "bench",
                    *(arg for t in targets for arg in ("--url", f"{t.name}={t.api}")),
                    "--model",
                    MODEL,
                    "--api-key",
                    key,
                    *LOAD,
                    "--rounds",
                    "3",
                    *sys.argv[1:],
                ]
            )
    finally:
        redis.terminate()
        redis.wait(10)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
