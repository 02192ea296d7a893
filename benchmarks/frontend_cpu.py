"""CPU of the front-end process per streamed token: sluice (whole gateway on) against vLLM's own
OpenAI server, same model, same engine options, same load, in turns, in one run.

    .venv/bin/python benchmarks/frontend_cpu.py --out docs/benchmarks/frontend

Both servers run vLLM's engine core in a child process; what differs is the process that
serves HTTP (tokenising, detokenising, building and sending chunks, and for sluice the
gateway). So only that process's CPU time (user + system, psutil, children excluded) is
read before and after each run and divided by the tokens streamed in it.

- sluice: `sluice serve` on the default model with the whole gateway on: a key with rpm,
  tpm and token and USD budgets on a throwaway Redis, prices, Prometheus metrics, the JSON
  log line per request, and OpenTelemetry spans at 100% sampling exported over OTLP/HTTP
  to a sink in this script.
- vLLM: `python -m vllm.entrypoints.openai.api_server` on the same folder, with the options
  sluice gives vLLM for it (float32, eager, priority scheduling, prompt-token details, the
  hermes tool parser and tool template: vLLM then runs its parser on every streamed delta,
  for both servers alike).

- sluice-bare (with `--bare`): a third server, sluice with no keys and telemetry off
  (`SLUICE_TELEMETRY__ENABLED=false`), to split sluice's figure into what its serving path
  costs and what the gateway and telemetry add per request.

Load: streaming chats of up to 128 greedy output tokens at 1, 16 and 32 concurrent (as
many requests as the concurrency times `--waves`), every setting run for each server in
turns for `--rounds` rounds (the order reversed every other round); throughput and TTFT are
reported beside CPU so parity is visible in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from sluice.app import DEFAULT_MODEL_TOOLS
from sluice.bench.command import Endpoint, measure
from sluice.bench.compare import (
    VLLM_CPU_ENV,
    OtlpSink,
    Target,
    bench_key,
    free_port,
    gateway_on_redis,
    running,
)
from sluice.bench.load import LoadSpec
from sluice.bench.report import Run
from sluice.bench.workload import Arrival, Lengths, shapes
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import ensure_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,32")
    parser.add_argument("--waves", type=int, default=2, help="requests per stream slot")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/frontend"))
    parser.add_argument(
        "--bare", action="store_true", help="also run sluice with no keys and telemetry off"
    )
    args = parser.parse_args()

    folder = ensure_default_model(Settings().cache_dir)
    work = Path(tempfile.mkdtemp(prefix="sluice-frontend-cpu-"))
    sluice_port, vllm_port, bare_port = free_port(), free_port(), free_port()
    with gateway_on_redis(work) as gateway_env:
        sluice_env = {
            **gateway_env,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": OtlpSink().url,
            "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": "1.0",
        }
        targets = [
            Target(
                "sluice",
                [sys.executable, "-m", "sluice", "serve", "--port", str(sluice_port)],
                sluice_port,
                sluice_env,
            ),
            Target(
                "vllm",
                [
                    sys.executable,
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    str(folder),
                    "--served-model-name",
                    DEFAULT_MODEL_NAME,
                    "--dtype",
                    "float32",
                    "--enforce-eager",
                    "--scheduling-policy",
                    "priority",
                    "--enable-prompt-tokens-details",
                    *DEFAULT_MODEL_TOOLS,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(vllm_port),
                ],
                vllm_port,
                VLLM_CPU_ENV,
            ),
        ]
        if args.bare:
            targets.append(
                Target(
                    "sluice-bare",
                    [sys.executable, "-m", "sluice", "serve", "--port", str(bare_port)],
                    bare_port,
                    {"SLUICE_TELEMETRY__ENABLED": "false"},
                )
            )
        print(f"server logs in {work}", flush=True)
        with running(targets, work) as processes:
            key = bench_key(targets[0].api)
            specs = {
                "sluice": LoadSpec(model=DEFAULT_MODEL_NAME, stream=True, api_key=key),
                "vllm": LoadSpec(model=DEFAULT_MODEL_NAME, stream=True),
                "sluice-bare": LoadSpec(model=DEFAULT_MODEL_NAME, stream=True),
            }
            cpu = {t.name: psutil.Process(p.pid) for t, p in zip(targets, processes, strict=True)}
            results = run_all(targets, specs, cpu, args)
    report(results, args.out)


def run_all(
    targets: list[Target],
    specs: dict[str, LoadSpec],
    cpu: dict[str, psutil.Process],
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    """Every concurrency, every round, every server in turn: one row per run."""
    rows: list[dict[str, object]] = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        requests = shapes(
            concurrency * args.waves,
            prompt_words=Lengths(32, 32),
            output_tokens=Lengths(args.max_tokens, args.max_tokens),
        )
        for round_no in range(1, args.rounds + 1):
            # ABBA order: no server always runs first (or right after the same other one).
            order = targets if round_no % 2 else list(reversed(targets))
            for target in order:
                endpoint = Endpoint(target.name, target.api)
                process = cpu[target.name]
                before = sum(process.cpu_times()[:2])
                (run,) = measure(
                    [endpoint],
                    specs[target.name],
                    requests,
                    [Arrival(concurrency=concurrency)],
                    rounds=1,
                    time_limit_s=600,
                    warmup=4 if round_no == 1 else 0,
                )
                seconds = sum(process.cpu_times()[:2]) - before
                rows.append(row(run, seconds, concurrency, round_no))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def row(run: Run, cpu_s: float, concurrency: int, round_no: int) -> dict[str, object]:
    result = run.result
    tokens = sum(r.completion_tokens for r in result.ok)
    return {
        "server": run.target,
        "concurrency": concurrency,
        "round": round_no,
        "requests": len(result.ok),
        "errors": len(result.records) - len(result.ok),
        "tokens": tokens,
        "tokens_per_s": result.output_tokens_per_s,
        "ttft_p50_s": result.ttft(50),
        "cpu_s": cpu_s,
        "cpu_ms_per_token": 1000 * cpu_s / tokens if tokens else None,
    }


SERVERS = ("sluice", "vllm", "sluice-bare")
FIELDS = (
    ("tokens_per_s", "tok/s", 1),
    ("ttft_p50_s", "TTFT p50 s", 3),
    ("cpu_ms_per_token", "CPU ms/token", 3),
)


def report(
    rows: list[dict[str, object]],
    out: Path,
    *,
    servers: tuple[str, ...] = SERVERS,
    baseline: str = "vllm",
    title: str = "front-end process CPU per streamed token (medians over rounds)",
) -> None:
    """Medians over rounds per server and concurrency, and each server's CPU over the
    baseline's."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    present = [s for s in servers if any(r["server"] == s for r in rows)]
    table = Table(title=title)
    table.add_column("concurrency", justify="right")
    for _, label, _ in FIELDS:
        for server in present:
            table.add_column(f"{server} {label}", justify="right")
    for server in present:
        if server != baseline:
            table.add_column(f"{server}/{baseline} CPU", justify="right")
    summary = []
    for concurrency in sorted({int(str(r["concurrency"])) for r in rows}):

        def median(server: str, field: str, c: int = concurrency) -> float:
            values = [
                float(str(r[field]))
                for r in rows
                if r["server"] == server and r["concurrency"] == c and r[field] is not None
            ]
            return statistics.median(values) if values else float("nan")

        line: dict[str, float] = {"concurrency": concurrency}
        cells = [str(concurrency)]
        for field, _, digits in FIELDS:
            for server in present:
                line[f"{server}_{field}"] = median(server, field)
                cells.append(f"{line[f'{server}_{field}']:.{digits}f}")
        for server in present:
            if server != baseline:
                ratio = line[f"{server}_cpu_ms_per_token"] / line[f"{baseline}_cpu_ms_per_token"]
                line[f"{server}_cpu_ratio"] = ratio
                cells.append(f"{ratio:.2f}x")
        summary.append(line)
        table.add_row(*cells)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    Console(width=200).print(table)
    print(f"files: {out}")


if __name__ == "__main__":
    main()
