"""How much one sluice process carries with the gateway on, measured on the synthetic engine
(no model) so the HTTP layer, keys, limits, budgets (Redis) and telemetry are all that works.

    .venv/bin/python benchmarks/gateway_capacity.py --out docs/benchmarks/gateway

Two loads, each a sweep driven by `sluice bench`'s own machinery:

- requests: non-streaming chats of one output token (the engine takes 0.1 ms), open-loop
  Poisson arrivals at rising rates (at most 256 in flight); capacity is the largest rate
  whose p99 end-to-end latency stays within `--slo-ms` (default 50 ms);
- tokens: streaming chats of 256 output tokens with every sequence at 100 tokens/s (a
  GPU-like per-sequence speed), at rising concurrency; each step offers concurrency times 100
  streamed tokens/s.

The load generator shares the two cores with the server, so for every run the server
process's CPU time is read too (psutil): CPU per request and per thousand streamed tokens,
and the ceiling of one process given a whole core (one event loop uses at most one core).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from sluice.bench.command import Endpoint, measure, print_report
from sluice.bench.compare import (
    Target,
    bench_key,
    free_port,
    gateway_on_redis,
    running,
    synthetic_server,
)
from sluice.bench.load import LoadSpec
from sluice.bench.plots import latency_plot, sweep_plot
from sluice.bench.report import Objective, Report, Run
from sluice.bench.workload import Arrival, Lengths, shapes

MODEL = "synthetic"
STREAM_TOKENS_PER_S = 100
STREAM_TOKENS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200,300,400,500,600", help="requests/s to offer")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each rate step")
    parser.add_argument("--concurrency", default="32,64,128,256", help="streams in flight")
    parser.add_argument("--waves", type=int, default=3, help="requests per stream slot")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="p99 objective, requests")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gateway"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluice-gateway-capacity-"))
    fast, paced = free_port(), free_port()
    with gateway_on_redis(work) as gateway_env:
        targets = [
            Target("requests", synthetic_server(fast, 10_000), fast, gateway_env),
            Target("tokens", synthetic_server(paced, STREAM_TOKENS_PER_S), paced, gateway_env),
        ]
        with running(targets, work) as processes:
            key = bench_key(targets[0].api)
            rates = [float(r) for r in args.rates.split(",")]
            requests = _sweep(
                targets[0],
                processes[0].pid,
                LoadSpec(model=MODEL, stream=False, api_key=key),
                [Arrival(rate=r, concurrency=256) for r in rates],
                count=lambda a: int((a.rate or 0) * args.seconds),
                max_tokens=1,
                objective=Objective(latency_s=args.slo_ms / 1000, percentile=99),
            )
            streams = [Arrival(concurrency=int(c)) for c in args.concurrency.split(",")]
            tokens = _sweep(
                targets[1],
                processes[1].pid,
                LoadSpec(model=MODEL, stream=True, api_key=key),
                streams,
                count=lambda a: (a.concurrency or 1) * args.waves,
                max_tokens=STREAM_TOKENS,
                objective=Objective(),
            )
    console = Console()
    for name, (report, cpu, axis) in {
        "requests": (*requests, "request rate"),
        "tokens": (*tokens, "concurrency"),
    }.items():
        print_report(console, report, axis_name=axis)
        console.print(_cpu_table(name, report, cpu))
        out = args.out / name
        report.write(out, {"model": MODEL, "load": name, "server_cpu_s": cpu})
        latency_plot(report, out / "latency.png")
        sweep_plot(report, out / "sweep.png", axis_name=axis)
        console.print(f"files: {out}")


def _sweep(
    target: Target,
    pid: int,
    spec: LoadSpec,
    arrivals: list[Arrival],
    *,
    count: Callable[[Arrival], int],
    max_tokens: int,
    objective: Objective,
) -> tuple[Report, dict[float, float]]:
    """Each arrival setting in turn, with the server's CPU seconds for each run."""
    server = psutil.Process(pid)
    endpoint = Endpoint(target.name, target.api)
    runs: list[Run] = []
    cpu: dict[float, float] = {}
    for position, arrival in enumerate(arrivals):
        requests = shapes(
            count(arrival),
            prompt_words=Lengths(32, 32),
            output_tokens=Lengths(max_tokens, max_tokens),
        )
        if position == 0:  # warm up, not measured
            measure([endpoint], spec, requests[:200], [arrival], rounds=1, time_limit_s=60)
        before = sum(server.cpu_times()[:2])
        runs += measure([endpoint], spec, requests, [arrival], rounds=1, time_limit_s=120, warmup=0)
        cpu[arrival.setting] = sum(server.cpu_times()[:2]) - before
        print(f"{target.name}: {arrival.label} done", flush=True)
    report = Report(
        runs=runs,
        objective=objective,
        targets=[target.name],
        settings=[a.setting for a in arrivals],
        labels={a.setting: a.label for a in arrivals},
    )
    return report, cpu


def _cpu_table(name: str, report: Report, cpu: dict[float, float]) -> Table:
    table = Table(title=f"{name}: the server process's CPU (the load generator not counted)")
    for column in (
        "load",
        "req/s",
        "streamed tok/s",
        "server CPU busy",
        "CPU ms / request",
        "CPU ms / 1k tokens",
        "ceiling req/s (1 core)",
        "ceiling tok/s (1 core)",
    ):
        table.add_column(column, justify="right")
    for run in report.runs:
        result, seconds = run.result, cpu[run.setting]
        ok = len(result.ok)
        tokens = sum(r.completion_tokens for r in result.ok)
        table.add_row(
            run.label,
            f"{result.requests_per_s:.1f}",
            f"{result.output_tokens_per_s:.0f}",
            f"{seconds / result.wall_s:.0%}",
            f"{1000 * seconds / ok:.2f}" if ok else "-",
            f"{1e6 * seconds / tokens:.1f}" if tokens else "-",
            f"{ok / seconds:.0f}" if seconds else "-",
            f"{tokens / seconds:.0f}" if seconds else "-",
        )
    return table


if __name__ == "__main__":
    main()
