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

import sys
import tempfile
from pathlib import Path

from sluice.bench.compare import (
    Target,
    bench_key,
    free_port,
    gateway_on_redis,
    running,
    synthetic_server,
)
from sluice.cli import main as sluice_main

MODEL = "synthetic"


LOAD = ["--no-stream", "--concurrency", "16", "--requests", "2000", "--max-tokens", "16"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sluice-gateway-bench-"))
    on_port, off_port = free_port(), free_port()
    with gateway_on_redis(work) as gateway_env:
        targets = [
            Target("gateway-on", synthetic_server(on_port), on_port, gateway_env),
            Target(
                "gateway-off",
                synthetic_server(off_port),
                off_port,
                {"SLUICE_CACHE_DIR": str(work)},
            ),
        ]
        with running(targets, work):
            key = bench_key(targets[0].api)
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
    raise SystemExit(code)


if __name__ == "__main__":
    main()
