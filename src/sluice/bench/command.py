"""`sluice bench`: load-test one or more OpenAI-compatible URLs and report what users would feel.

- Load: a fixed concurrency (closed loop) or an arrival rate (open loop, Poisson or bursty),
  prompt and output lengths drawn from distributions or prompts from a JSONL file, streaming
  or not, chat or completions. Every run is bounded by a request count and a time limit.
- Compare: several `--url`s run in turns (A B A B …) under the same requests; ratios pair
  by pair, round by round.
- Sweep and capacity: `--sweep` runs each concurrency (or rate) in turn and reports the
  largest one whose p95 (or `--capacity-percentile`) meets the objective.

Prints tables, writes `records.json` (every request), `summary.json`, `latency.png` and, for a
sweep, `sweep.png` into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from sluice.bench.load import LoadSpec, RequestRecord, bearer, run_spec
from sluice.bench.report import Objective, Report, Run, table
from sluice.bench.workload import Arrival, Lengths, Shape, WorkloadError, shapes

WARMUP_REQUESTS = 4


class BenchError(ValueError):
    """Input `sluice bench` cannot use; `str(exc)` is one sentence for the user."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str

    @classmethod
    def parse(cls, text: str, index: int) -> Endpoint:
        name, sep, url = text.partition("=")
        if not sep or "://" in name:
            name, url = ("target" if index == 0 else f"target{index + 1}"), text
        if not url.startswith(("http://", "https://")):
            raise BenchError(f"--url {text!r} is not an http(s) URL.")
        return cls(name, url.rstrip("/"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        default=None,
        metavar="[NAME=]URL",
        help="base URL of an OpenAI-compatible API (…/v1); repeat to compare targets in turns "
        "(default http://127.0.0.1:8000/v1)",
    )
    parser.add_argument("--model", default=None, help="model id (default: the first listed)")
    parser.add_argument("--api-key", default=None, help="sent as a bearer token to every target")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight (closed loop; default 8); with --rate, the cap in flight",
    )
    load.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="with --rate: gamma shape of the gaps; 1 is Poisson, below 1 burstier",
    )
    load.add_argument(
        "--sweep",
        default=None,
        metavar="V1,V2,…",
        help="run each concurrency (or, with --rate, each rate) in turn, e.g. 1,4,16,32",
    )
    load.add_argument("--rounds", type=int, default=1, help="repeat every run, in turns")
    load.add_argument("--requests", type=int, default=64, help="requests per run")
    load.add_argument("--time-limit", type=float, default=600.0, help="seconds per run, at most")
    load.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths and gaps")
    shape = parser.add_argument_group("request shapes")
    shape.add_argument(
        "--prompt-words",
        default="32",
        help="filler prompt length: N, fixed:N or uniform:LOW:HIGH words",
    )
    shape.add_argument(
        "--max-tokens",
        "--output-tokens",
        dest="max_tokens",
        default="64",
        help="output tokens per request: N, fixed:N or uniform:LOW:HIGH",
    )
    shape.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="JSONL of real prompts: a 'prompt' and optionally a 'max_tokens' per line",
    )
    slo = parser.add_argument_group("objective (goodput and capacity)")
    slo.add_argument("--slo-latency", type=float, default=None, help="end-to-end seconds")
    slo.add_argument("--slo-ttft", type=float, default=None, help="seconds to the first token")
    slo.add_argument(
        "--capacity-percentile",
        type=float,
        default=95,
        help="percentile the objective applies to for capacity (default 95)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for the report files"
    )


def _model(url: str, api_key: str | None) -> str:
    try:
        listed = httpx.get(f"{url}/models", headers=bearer(api_key), timeout=10)
        model: str = listed.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        raise BenchError(
            f"Could not list models at {url}; is the server up? Pass --model to skip."
        ) from None
    return model


def _sweep(args: argparse.Namespace) -> list[Arrival]:
    if args.sweep is None:
        default = 8 if args.concurrency is None else args.concurrency
        values = [args.rate] if args.rate is not None else [default]
    else:
        try:
            values = [float(v) for v in args.sweep.split(",") if v.strip()]
        except ValueError:
            raise BenchError(
                f"--sweep takes comma-separated numbers (got {args.sweep!r})."
            ) from None
        if not values:
            raise BenchError("--sweep needs at least one value.")
    if args.rate is None:
        if any(v != int(v) for v in values):
            raise BenchError("A concurrency sweep takes whole numbers.")
        return [Arrival(concurrency=int(v)) for v in sorted(values)]
    return [
        Arrival(concurrency=args.concurrency, rate=v, burstiness=args.burstiness)
        for v in sorted(values)
    ]


def _validate(args: argparse.Namespace) -> None:
    if args.requests < 1 or args.rounds < 1:
        raise BenchError("--requests and --rounds must be at least 1.")
    if args.time_limit <= 0:
        raise BenchError("--time-limit must be above 0 seconds.")
    if not 0 < args.capacity_percentile <= 100:
        raise BenchError("--capacity-percentile must be within 0..100.")
    for name in ("slo_latency", "slo_ttft"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise BenchError(f"--{name.replace('_', '-')} must be above 0 seconds.")


def measure(
    endpoints: list[Endpoint],
    spec: LoadSpec,
    requests: list[Shape],
    arrivals: list[Arrival],
    *,
    rounds: int,
    time_limit_s: float,
    seed: int = 0,
    warmup: int = WARMUP_REQUESTS,
    on_done: Callable[[RequestRecord], None] | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Warm every endpoint up, then for each arrival setting run `rounds` rounds, every
    endpoint in turn within a round, all with the same `requests`."""
    for endpoint in endpoints:
        if warmup:
            asyncio.run(
                run_spec(
                    endpoint.url,
                    spec,
                    requests[:1] * warmup,
                    Arrival(concurrency=warmup),
                    timeout_s=time_limit_s,
                )
            )
    runs = []
    for arrival in arrivals:
        for round_no in range(1, rounds + 1):
            for endpoint in endpoints:
                result = asyncio.run(
                    run_spec(
                        endpoint.url,
                        spec,
                        requests,
                        arrival,
                        timeout_s=time_limit_s,
                        seed=seed,
                        on_done=on_done,
                    )
                )
                run = Run(
                    endpoint.name, endpoint.url, arrival.setting, arrival.label, round_no, result
                )
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    return runs


def print_report(console: Console, report: Report, *, axis_name: str) -> None:
    medians, ratios = report.medians, report.ratios
    for setting in report.settings:
        console.print(table(report.labels[setting], medians[setting]))
        for pair, pair_ratios in ratios[setting].items():
            console.print(
                f"  {pair}: "
                + ", ".join(
                    f"{r.figure} {r.median:.2f}x ({r.low:.2f}-{r.high:.2f})" for r in pair_ratios
                )
            )
    if report.objective.given:
        for target, (best, miss) in report.capacities.items():
            if best is None:
                found = "no setting meets it"
            else:
                found = f"largest {axis_name} meeting it: {best:g}"
            tail = f" (first miss at {miss:g})" if miss is not None else " (every setting met it)"
            console.print(f"capacity of {target} against {report.objective}: {found}{tail}")


def bench(args: argparse.Namespace) -> int:
    """Run the load of `args`; print the report; write the files. Returns an exit code."""
    _validate(args)
    try:
        prompt_words = Lengths.parse(args.prompt_words, what="--prompt-words")
        output_tokens = Lengths.parse(args.max_tokens, what="--max-tokens")
        arrivals = _sweep(args)
        requests = shapes(
            args.requests,
            prompt_words=prompt_words,
            output_tokens=output_tokens,
            prompts_file=args.prompts_file,
            seed=args.seed,
        )
    except WorkloadError as exc:
        raise BenchError(str(exc)) from None
    endpoints = [
        Endpoint.parse(u, i) for i, u in enumerate(args.url or ["http://127.0.0.1:8000/v1"])
    ]
    if len({e.name for e in endpoints}) != len(endpoints):
        raise BenchError("Give every --url a different NAME (NAME=URL).")
    model = args.model or _model(endpoints[0].url, args.api_key)
    spec = LoadSpec(
        model=model, endpoint=args.endpoint, stream=not args.no_stream, api_key=args.api_key
    )
    objective = Objective(args.slo_latency, args.slo_ttft, args.capacity_percentile)
    axis_name = "request rate" if args.rate is not None else "concurrency"
    console = Console()
    total = args.requests * args.rounds * len(arrivals) * len(endpoints)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=total)

        def after_run(run: Run) -> None:
            result = run.result
            progress.console.print(
                f"{run.target} · {run.label} · round {run.round}: "
                f"{result.requests_per_s:.2f} req/s, {result.output_tokens_per_s:.1f} output "
                f"tok/s, latency p95 {result.latency(95):.3f} s, "
                f"{len(result.records) - len(result.ok)} errors"
            )

        runs = measure(
            endpoints,
            spec,
            requests,
            arrivals,
            rounds=args.rounds,
            time_limit_s=args.time_limit,
            seed=args.seed,
            on_done=lambda _: progress.advance(task),
            on_run=after_run,
        )
    report = Report(
        runs=runs,
        objective=objective,
        targets=[e.name for e in endpoints],
        settings=[a.setting for a in arrivals],
        labels={a.setting: a.label for a in arrivals},
    )
    print_report(console, report, axis_name=axis_name)
    meta = {
        "model": model,
        "targets": {e.name: e.url for e in endpoints},
        "endpoint": args.endpoint,
        "stream": not args.no_stream,
        "requests_per_run": args.requests,
        "rounds": args.rounds,
        "prompt_words": str(prompt_words) if args.prompts_file is None else str(args.prompts_file),
        "max_tokens": str(output_tokens),
        "seed": args.seed,
    }
    files = report.write(args.out, meta)
    try:
        from sluice.bench.plots import latency_plot, sweep_plot  # matplotlib loads only here
    except ImportError:
        console.print("no plots: matplotlib is not installed (pip install 'sluice[bench]')")
    else:
        files["latency"] = latency_plot(report, args.out / "latency.png")
        if len(arrivals) > 1:
            files["sweep"] = sweep_plot(report, args.out / "sweep.png", axis_name=axis_name)
    for name, path in files.items():
        console.print(f"{name}: {path}")
    return 0
