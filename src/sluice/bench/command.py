"""`sluice bench`: load-test any OpenAI-compatible URL and report what users would feel.

Fixed concurrency, bounded by a request count and a time limit. Prompts are `--prompt-words`
filler words or the `prompt` field of each line of a JSONL file. Prints a table (requests/s,
input and output tokens/s, TTFT, inter-token latency and end-to-end latency at p50/p95/p99,
errors by status, goodput against the objectives given) and writes every request's record to
a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from sluice.bench.load import LoadResult, LoadSpec, run_spec

FILLER = "the quick brown fox jumps over the lazy dog and keeps running through the field"


class BenchError(ValueError):
    """Input `sluice bench` cannot use; `str(exc)` is one sentence for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000/v1", help="base URL of the OpenAI-compatible API"
    )
    parser.add_argument("--model", default=None, help="model id (default: the first listed)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="how many requests in all")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32, help="filler prompt length")
    parser.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="JSONL file with a 'prompt' field per line (real prompts)",
    )
    parser.add_argument(
        "--slo-latency", type=float, default=None, help="goodput objective: end-to-end seconds"
    )
    parser.add_argument(
        "--slo-ttft", type=float, default=None, help="goodput objective: seconds to the first token"
    )
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds, in all")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for records.json"
    )


def _prompts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prompts_file is None:
        words = FILLER.split()
        return (" ".join(words[i % len(words)] for i in range(args.prompt_words)),)
    prompts = []
    try:
        lines = args.prompts_file.read_text().splitlines()
    except OSError as exc:
        raise BenchError(f"Cannot read {args.prompts_file}: {exc.strerror}.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BenchError(
                f"{args.prompts_file} line {number} is not a JSON object with a 'prompt'."
            ) from None
        prompts.append(str(prompt))
    if not prompts:
        raise BenchError(f"{args.prompts_file} holds no prompts.")
    return tuple(prompts)


def _model(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        listed = httpx.get(f"{args.url.rstrip('/')}/models", headers=headers, timeout=10)
        model: str = listed.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        raise BenchError(
            f"Could not list models at {args.url}; is the server up? Pass --model to skip."
        ) from None
    return model


def _table(result: LoadResult, args: argparse.Namespace, model: str) -> Table:
    table = Table(
        title=f"{model} at {args.url}: {len(result.records)} requests, "
        f"concurrency {args.concurrency}, {result.wall_s:.1f} s"
    )
    table.add_column("metric")
    for column in ("p50", "p95", "p99"):
        table.add_column(column, justify="right")
    for name, measure in (
        ("TTFT (s)", result.ttft),
        ("inter-token latency (s)", result.itl),
        ("end-to-end latency (s)", result.latency),
    ):
        table.add_row(name, *(f"{measure(q):.3f}" for q in (50, 95, 99)))
    table.add_section()
    table.add_row("requests/s", f"{result.requests_per_s:.2f}", "", "")
    table.add_row("input tokens/s", f"{result.input_tokens_per_s:.1f}", "", "")
    table.add_row("output tokens/s", f"{result.output_tokens_per_s:.1f}", "", "")
    errors = result.errors_by_status()
    table.add_row(
        "errors by status",
        ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none",
        "",
        "",
    )
    if args.slo_latency is not None or args.slo_ttft is not None:
        goodput = result.goodput(max_latency_s=args.slo_latency, max_ttft_s=args.slo_ttft)
        table.add_row("goodput", f"{goodput:.1%}", "", "")
    return table


def bench(args: argparse.Namespace) -> int:
    """Run the load of `args`; print the report; write the records. Returns an exit code."""
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        raise BenchError("--concurrency, --requests and --max-tokens must be at least 1.")
    model = _model(args)
    spec = LoadSpec(
        model=model,
        max_tokens=args.max_tokens,
        prompts=_prompts(args),
        endpoint=args.endpoint,
        stream=not args.no_stream,
        api_key=args.api_key,
    )
    console = Console()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=args.requests)
        result = asyncio.run(
            run_spec(
                args.url,
                spec,
                concurrency=args.concurrency,
                requests=args.requests,
                timeout_s=args.time_limit,
                on_done=lambda _: progress.advance(task),
            )
        )
    console.print(_table(result, args, model))
    args.out.mkdir(parents=True, exist_ok=True)
    records = args.out / "records.json"
    records.write_text(
        json.dumps(
            {
                "model": model,
                "url": args.url,
                "concurrency": args.concurrency,
                "wall_s": result.wall_s,
                "records": [dataclasses.asdict(r) for r in result.records],
            },
            indent=1,
        )
    )
    console.print(f"records: {records}")
    return 0
