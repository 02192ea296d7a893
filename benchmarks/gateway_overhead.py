"""The cost of the gateway: the same load on sluice with keys, rate limits, budgets and the
Redis store on, against sluice with no keys (the open server), side by side in one run.

    .venv/bin/python benchmarks/gateway_overhead.py --rounds 3

Both servers run the synthetic engine (fast, so the gateway's own cost is what shows) and
a real `redis-server` on a free port backs the gateway-on side. Each request is
authenticated, checked against RPM and TPM buckets and a token and USD budget in one Lua
call, and settled in another. Goal: at most 2 ms added at p50 per request and at most 5%
of throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from sluice.bench.compare import Target, free_port, running
from sluice.bench.load import LoadResult, LoadSpec, run_spec

MODEL = "synthetic"
ADMIN = "bench-admin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

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

    def serve(port: int) -> list[str]:
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
            "2000",
            "--log-level",
            "warning",
        ]

    targets = [
        Target(
            "gateway-on",
            serve(on_port),
            on_port,
            {
                "SLUICE_GATEWAY__STORE": "redis",
                "SLUICE_GATEWAY__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "SLUICE_GATEWAY__ADMIN_KEY": ADMIN,
                "SLUICE_PRICING__DEFAULT__INPUT_USD_PER_MTOK": "0.5",
                "SLUICE_PRICING__DEFAULT__OUTPUT_USD_PER_MTOK": "1.5",
            },
        ),
        Target("gateway-off", serve(off_port), off_port, {"SLUICE_CACHE_DIR": str(work)}),
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
            results = _alternate(targets, key, args)
    finally:
        redis.terminate()
        redis.wait(10)
    _report(results)


def _alternate(
    targets: list[Target], key: str, args: argparse.Namespace
) -> dict[str, list[LoadResult]]:
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    print(
        f"load: {args.concurrency} concurrent non-streaming chats, {args.max_tokens} tokens, "
        f"{args.requests} requests per run, {args.rounds} rounds"
    )
    for round_no in range(0, args.rounds + 1):  # round 0 warms up and is not counted
        for target in targets:
            spec = LoadSpec(
                model=MODEL,
                max_tokens=args.max_tokens,
                prompts=("Say something about lighthouses.",),
                stream=False,
                api_key=key if target.name == "gateway-on" else None,
            )
            result = asyncio.run(
                run_spec(
                    target.api,
                    spec,
                    concurrency=args.concurrency,
                    requests=args.requests if round_no else 200,
                )
            )
            if round_no == 0:
                continue
            results[target.name].append(result)
            print(
                f"round {round_no} {target.name:12s} {result.requests_per_s:7.1f} req/s "
                f"{result.output_tokens_per_s:8.0f} tok/s  latency p50 "
                f"{result.latency(50) * 1000:6.2f} ms  p99 {result.latency(99) * 1000:6.2f} ms"
                f"  errors {result.errors_by_status()}",
                flush=True,
            )
    return results


def _report(results: dict[str, list[LoadResult]]) -> None:
    med = {
        name: (
            statistics.median(r.requests_per_s for r in runs),
            statistics.median(r.latency(50) for r in runs) * 1000,
            statistics.median(r.latency(99) for r in runs) * 1000,
        )
        for name, runs in results.items()
    }
    print("\nmedian over rounds")
    print(f"{'target':12s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, (rps, p50, p99) in med.items():
        print(f"{name:12s} {rps:8.1f} {p50:8.2f} {p99:8.2f}")
    on, off = med["gateway-on"], med["gateway-off"]
    print(
        f"\ngateway on / off: throughput {on[0] / off[0]:.3f}x, "
        f"p50 added {on[1] - off[1]:+.2f} ms, p99 added {on[2] - off[2]:+.2f} ms"
    )


if __name__ == "__main__":
    main()
