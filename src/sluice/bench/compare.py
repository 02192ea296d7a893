"""Side-by-side comparison of OpenAI-compatible servers started as local processes.

Each target is started once; then the same load runs against them in turns (A B A B …),
so drift on a noisy machine hits every target alike. Medians over rounds and ratios against
the first target are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sluice.bench.load import LoadResult, run_load

START_TIMEOUT_S = 300.0


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


def alternate(
    targets: list[Target],
    *,
    model: str,
    rounds: int,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str,
) -> dict[str, list[LoadResult]]:
    """Warm each target up, then run `rounds` rounds of the same load in turns."""
    for target in targets:
        asyncio.run(
            run_load(
                target.api,
                model,
                concurrency=min(4, concurrency),
                requests=4,
                max_tokens=8,
                prompt=prompt,
            )
        )
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for round_no in range(1, rounds + 1):
        for target in targets:
            result = asyncio.run(
                run_load(
                    target.api,
                    model,
                    concurrency=concurrency,
                    requests=requests,
                    max_tokens=max_tokens,
                    prompt=prompt,
                )
            )
            results[target.name].append(result)
            failed = len(result.records) - len(result.ok)
            print(
                f"round {round_no} {target.name:14s} {result.output_tokens_per_s:7.1f} tok/s"
                f"  TTFT p50 {result.ttft(50):5.2f} s  p95 {result.ttft(95):5.2f} s"
                f"  failed {failed}",
                flush=True,
            )
    return results


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options every comparison script takes."""
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=64)


def compare(targets: list[Target], args: argparse.Namespace, *, model: str, prompt: str) -> None:
    """Start `targets`, run the load of `args` on them in turns, print the comparison."""
    log_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    print(
        f"logs in {log_dir}; load: {args.concurrency} concurrent streaming chat requests, "
        f"{args.max_tokens} output tokens, {args.requests} requests per run",
        flush=True,
    )
    with running(targets, log_dir):
        results = alternate(
            targets,
            model=model,
            rounds=args.rounds,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            prompt=prompt,
        )
    report(results)


def report(results: dict[str, list[LoadResult]]) -> None:
    """Medians over rounds, then every target's ratios to the first."""
    medians = {
        name: (
            statistics.median(r.output_tokens_per_s for r in runs),
            statistics.median(r.ttft(50) for r in runs),
            statistics.median(r.ttft(95) for r in runs),
        )
        for name, runs in results.items()
    }
    print("\nmedian over rounds")
    print(f"{'target':14s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s}")
    for name, (tps, p50, p95) in medians.items():
        print(f"{name:14s} {tps:8.1f} {p50:8.2f}s {p95:8.2f}s")
    (base_name, base), *others = medians.items()
    for name, (tps, p50, p95) in others:
        print(
            f"\n{base_name} / {name}: throughput {base[0] / tps:.2f}x, "
            f"TTFT p50 {base[1] / p50:.2f}x, TTFT p95 {base[2] / p95:.2f}x"
        )
