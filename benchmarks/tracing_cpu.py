"""CPU of sluice's process per streamed token with tracing at 100% sampling (exported over
OTLP/HTTP) against tracing sampled out, on the synthetic engine, in turns, in one run.

    .venv/bin/python benchmarks/tracing_cpu.py --out docs/benchmarks/tracing/one-process
    .venv/bin/python benchmarks/tracing_cpu.py --per-request \
        --out docs/benchmarks/tracing/per-request

The first command compares whole-server CPU per streamed token (below); the second measures
what tracing adds per request alone, against sampled out and against tracing off, which
this machine's ±10% scatter cannot hide (`per_request`).

One `sluice serve --engine synthetic` process (no weights: the engine is a timer, so the
process's CPU is sluice's own and token rates are far above a CPU model's), per-request
metrics and the JSON log line on, spans exported over OTLP/HTTP to a sink in this script.
The same process serves both sides of the comparison, switched between blocks of load:

- traced: the sampler's ratio 1.0, every span recorded and exported;
- untraced: ratio 0 (spans are created non-recording, nothing is exported).

The switch: the server runs through this file's `serve` subcommand, which starts
`sluice serve` unchanged except that SIGUSR1 sets the root sampler's ratio
(`ErrorBiasedSampler.ratio_sampler`) to the number in a control file. Two servers, one per
side (`--two-processes`, the first method), differ by more than tracing (heap layout, the
core each runs on); one process switching between the two leaves tracing as the only
difference between a pair's blocks.

Load: per block, streaming chats of 128 output tokens at 32 concurrent (`--waves` requests
per slot) from a synthetic engine at 150 tokens/s per sequence, which keeps sluice's process
busy (about two thirds of a core): a mostly idle process spends a varying share of its CPU
waking up, which scatters the figures. Blocks in pairs, the order reversed every other pair
(ABBA); the span exporter's batch delay is 0.5 s and each block waits 1 s after its load
before the CPU is read, so a block's export is counted in its own block. CPU time (user +
system, every thread) over the tokens streamed. Reported: each pair's traced ÷ untraced,
their median and mean with a 95% confidence interval. The goal (issue 12): tracing costs
at most 3% CPU per streamed token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SERVERS = ("traced", "untraced")
RATIO = {"traced": "1.0", "untraced": "0.0"}
CONTROL_ENV = "SLUICE_BENCH_SAMPLER_CONTROL"
# The batch span processor exports every 0.5 s (OTel's default: 5 s; a shorter delay means
# more, smaller exports: if anything, a dearer tracing), and each block waits past it, so a
# block's spans are exported, and counted, within the block.
EXPORT_DELAY_MS = 500
EXPORT_WAIT_S = 1.0
# Student's t, two-sided 95%, by degrees of freedom (a table: scipy is not a dependency).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
T95.update({10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00})


def mean_ci95(values: list[float]) -> tuple[float, list[float]]:
    """The mean of `values` and its two-sided 95% interval (Student's t)."""
    mean = statistics.mean(values)
    df = len(values) - 1
    t = T95[max(k for k in T95 if k <= df)] if df < 60 else 1.98
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


def serve(argv: list[str]) -> None:
    """`sluice serve argv`, with SIGUSR1 setting the root sampler's ratio from the control
    file named by `SLUICE_BENCH_SAMPLER_CONTROL`."""
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    import sluice.app
    from sluice.cli import main as sluice_main

    samplers: list[sluice.app.ErrorBiasedSampler] = []
    build = sluice.app.build_tracer_provider

    def capture(**kwargs):  # type: ignore[no-untyped-def]
        samplers.append(kwargs["sampler"])
        return build(**kwargs)

    def switch(signum: int, frame: object) -> None:
        ratio = float(Path(os.environ[CONTROL_ENV]).read_text())
        for sampler in samplers:
            sampler.ratio_sampler = TraceIdRatioBased(ratio)  # one attribute: atomic

    sluice.app.build_tracer_provider = capture  # type: ignore[assignment]
    signal.signal(signal.SIGUSR1, switch)
    sys.argv = ["sluice", "serve", *argv]
    sluice_main()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="32")
    parser.add_argument("--waves", type=int, default=2, help="requests per stream slot")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=40, help="traced/untraced block pairs")
    parser.add_argument("--block", type=int, default=2000, help="requests per block, --per-request")
    parser.add_argument("--rounds", type=int, default=3, help="with --two-processes")
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=None,
        help="per sequence (default: 150 in one process, 50 with --two-processes)",
    )
    parser.add_argument(
        "--two-processes",
        action="store_true",
        help="the first method: one server per side, in turns",
    )
    parser.add_argument(
        "--per-request",
        action="store_true",
        help="what tracing adds per streamed request, the app in this process (see below)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/tracing"))
    args = parser.parse_args()
    if args.tokens_per_s is None:
        args.tokens_per_s = 50.0 if args.two_processes else 150.0
    if args.per_request:
        per_request(args)
    elif args.two_processes:
        two_processes(args)
    else:
        one_process(args)


def _command(port: int, tokens_per_s: float, module: list[str]) -> list[str]:
    from sluice.config import DEFAULT_MODEL_NAME

    command = [sys.executable, *module, "--port", str(port)]
    command += ["--engine", "synthetic", "--served-model-name", DEFAULT_MODEL_NAME]
    return [*command, "--synthetic-tokens-per-s", str(tokens_per_s)]


def one_process(args: argparse.Namespace) -> None:
    from frontend_cpu import row

    from sluice.bench.command import Endpoint, measure
    from sluice.bench.compare import OtlpSink, Target, free_port, running
    from sluice.bench.load import LoadSpec
    from sluice.bench.workload import Arrival, Lengths, shapes
    from sluice.config import DEFAULT_MODEL_NAME, Settings
    from sluice.engine.models import ensure_default_model

    ensure_default_model(Settings().cache_dir)  # the synthetic engine's tokenizer
    work = Path(tempfile.mkdtemp(prefix="sluice-tracing-cpu-"))
    control = work / "sampler-ratio"
    control.write_text("1.0")
    port = free_port()
    sink = OtlpSink()
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.url,
        "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": "1.0",
        "OTEL_BSP_SCHEDULE_DELAY": str(EXPORT_DELAY_MS),
        CONTROL_ENV: str(control),
    }
    command = _command(port, args.tokens_per_s, [str(Path(__file__).resolve()), "serve"])
    target = Target("sluice", command, port, env)
    concurrency = int(args.concurrency.split(",")[0])
    requests = shapes(
        concurrency * args.waves,
        prompt_words=Lengths(32, 32),
        output_tokens=Lengths(args.max_tokens, args.max_tokens),
    )
    spec = LoadSpec(model=DEFAULT_MODEL_NAME, stream=True)
    print(f"server log in {work}", flush=True)
    rows: list[dict[str, object]] = []
    with running([target], work) as (process,):
        server = psutil.Process(process.pid)
        endpoint = Endpoint("sluice", target.api)

        def block(side: str, pair: int, warmup: int = 0) -> dict[str, object]:
            control.write_text(RATIO[side])
            os.kill(process.pid, signal.SIGUSR1)
            time.sleep(0.5)
            before, exports = sum(server.cpu_times()[:2]), sink.exports
            (run,) = measure(
                [endpoint],
                spec,
                requests,
                [Arrival(concurrency=concurrency)],
                rounds=1,
                time_limit_s=600,
                warmup=warmup,
            )
            time.sleep(EXPORT_WAIT_S)  # the block's spans are exported within its own CPU
            cpu_s = sum(server.cpu_times()[:2]) - before
            figures = row(dataclasses.replace(run, target=side), cpu_s, concurrency, pair)
            figures["otlp_exports"] = sink.exports - exports  # none when sampled out
            return figures

        block("traced", 0, warmup=4)  # warm-up block, not counted
        for pair in range(1, args.pairs + 1):
            order = SERVERS if pair % 2 else tuple(reversed(SERVERS))
            for side in order:
                rows.append(block(side, pair))
                print(json.dumps(rows[-1]), flush=True)
    report_pairs(rows, args.out)


def report_pairs(rows: list[dict[str, object]], out: Path) -> None:
    """Each pair's traced ÷ untraced CPU per token; median, mean and its 95% interval."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))

    def per_token(side: str, pair: object) -> float:
        (r,) = [r for r in rows if r["server"] == side and r["round"] == pair]
        return float(str(r["cpu_ms_per_token"]))

    pairs = sorted({r["round"] for r in rows}, key=lambda p: int(str(p)))
    exports = {side: [r["otlp_exports"] for r in rows if r["server"] == side] for side in SERVERS}
    if not all(exports["traced"]) or any(exports["untraced"]):
        raise SystemExit(f"the sampler switch did not take: OTLP exports per block {exports}")
    ratios = [per_token("traced", p) / per_token("untraced", p) for p in pairs]
    mean, ci95 = mean_ci95(ratios)
    summary = {
        "pairs": len(ratios),
        "traced_cpu_ms_per_token_median": statistics.median(per_token("traced", p) for p in pairs),
        "untraced_cpu_ms_per_token_median": statistics.median(
            per_token("untraced", p) for p in pairs
        ),
        "ratio_median": statistics.median(ratios),
        "ratio_mean": mean,
        "ratio_ci95": ci95,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "ratios"}, indent=1))
    print(f"files: {out}")


def per_request(args: argparse.Namespace) -> None:
    """What tracing adds per streamed request, in CPU: the tracing sluice does for one
    request, alone, in this process, traced against sampled out.

    A side-by-side of whole servers measures tracing's share as the small difference of two
    large, noisy figures (this machine's CPU per token scatters by ±10% block to block); this
    measures the small quantity itself, so the scatter is ±10% of it. The work is sluice's
    own, through its own functions: a FastAPI app instrumented by `instrument` (the server
    span, as create_app does), a route that makes the GenAI span as `Exchange` does
    (`GenerationSpan` with the same attributes, `on_delta` per streamed output, `finish`),
    the provider from `build_tracer_provider` with the `ErrorBiasedSampler`, spans exported
    by the OTLP/HTTP exporter to a sink in another process. The ASGI app is called directly
    (no HTTP), `--block` requests per block, blocks rotating (ABC, then CBA) between the
    sampler's ratio 1 (traced), ratio 0 (sampled out: the instrumentation still runs, with
    non-recording spans) and tracing off (telemetry disabled: no instrumentation, the no-op
    tracer, as create_app does then), each block ending with the provider's flush so its
    export is in its CPU. Reported: this process's CPU per request on each side, and traced
    minus each of the other two, per pair."""
    import asyncio

    from fastapi import FastAPI
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from starlette.responses import Response

    from sluice.telemetry.tracing import (
        ErrorBiasedSampler,
        ErrorRateWindow,
        GenerationSpan,
        build_tracer_provider,
        instrument,
    )

    sink = subprocess.Popen(
        [sys.executable, "-c", SINK_PROCESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdin is not None
    assert sink.stdout is not None
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = sink.stdout.readline().strip()
    model = "SmolLM2-135M-Instruct"
    sampler = ErrorBiasedSampler(1.0, ErrorRateWindow(60.0), 0.05, 20)
    provider = build_tracer_provider(model=model, sampler=sampler, exporter=None)
    tracer = provider.get_tracer("sluice")
    outputs = args.max_tokens

    def app_of(tracer: trace.Tracer) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat() -> Response:  # the spans of one streamed chat, as Exchange makes them
            span = GenerationSpan(
                tracer,
                otel_context.get_current(),
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.system": "vllm",
                    "gen_ai.request.model": model,
                    "gen_ai.request.max_tokens": outputs,
                    "gen_ai.request.temperature": 0.0,
                    "gen_ai.request.top_p": 1.0,
                },
                "chat",
                model,
            )
            for _ in range(outputs):
                span.on_delta()
            span.finish(
                response_id="chatcmpl-0123456789abcdef",
                input_tokens=40,
                output_tokens=outputs,
                finish_reasons=["length"],
                error=None,
            )
            return Response(b"data: [DONE]\n\n", media_type="text/event-stream")

        return app

    traced_app = app_of(tracer)
    instrument(traced_app, provider)
    # tracing off: no instrumentation, and the no-op tracer sluice's code gets then
    apps = {"traced": traced_app, "untraced": traced_app, "off": app_of(trace.NoOpTracer())}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"user-agent", b"OpenAI/Python 1.109.1"),
            (b"content-length", b"2"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        pass

    async def block(side: str, pair: int) -> dict[str, object]:
        sampler.ratio_sampler = TraceIdRatioBased(float(RATIO.get(side, "0.0")))
        app = apps[side]
        before = time.process_time()
        for _ in range(args.block):
            await app(dict(scope), receive, send)
        provider.force_flush()  # the block's export, in the exporter's thread, counts here
        cpu_ms = 1000 * (time.process_time() - before)
        return {"server": side, "round": pair, "requests": args.block, "cpu_ms": cpu_ms}

    async def run() -> list[dict[str, object]]:
        sides = (*SERVERS, "off")
        for side in sides:
            await block(side, 0)  # warm-up, not counted
        rows = []
        for pair in range(1, args.pairs + 1):
            order = sides if pair % 2 else tuple(reversed(sides))
            for side in order:
                rows.append(await block(side, pair))
        return rows

    try:
        rows = asyncio.run(run())
    finally:
        provider.shutdown()
        sink.stdin.close()
        exports = int(sink.stdout.readline() or 0)
        sink.wait(10)
    if not exports:
        raise SystemExit("the OTLP sink received nothing: the traced side exported no span")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))

    def per_request_ms(side: str, pair: int) -> float:
        (r,) = [r for r in rows if r["server"] == side and r["round"] == pair]
        return float(str(r["cpu_ms"])) / args.block

    pairs = range(1, args.pairs + 1)

    def difference(side: str, baseline: str) -> dict[str, object]:
        """`side` minus `baseline`, µs per request, per pair: mean, 95% interval, median."""
        added = [1000 * (per_request_ms(side, p) - per_request_ms(baseline, p)) for p in pairs]
        mean, ci95 = mean_ci95(added)
        return {"mean": mean, "ci95": ci95, "median": statistics.median(added)}

    summary = {
        "pairs": len(pairs),
        "requests_per_block": args.block,
        "output_tokens_per_request": outputs,
        "otlp_exports": exports,
        **{
            f"{side}_us_per_request_median": 1000
            * statistics.median(per_request_ms(side, p) for p in pairs)
            for side in ("traced", "untraced", "off")
        },
        "tracing_us_per_request_vs_sampled_out": difference("traced", "untraced"),
        "tracing_us_per_request_vs_off": difference("traced", "off"),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"files: {args.out}")


# An OTLP/HTTP sink in its own process (its CPU is not the measured process's).
SINK_PROCESS = """
import sys
from sluice.bench.compare import OtlpSink
sink = OtlpSink()
print(sink.url, flush=True)
sys.stdin.read()  # until the benchmark closes it
print(sink.exports, flush=True)
"""


def two_processes(args: argparse.Namespace) -> None:
    """The first method: a traced and an untraced server, in turns (ABBA rounds)."""
    from frontend_cpu import report, run_all

    from sluice.bench.compare import OtlpSink, Target, free_port, running
    from sluice.bench.load import LoadSpec
    from sluice.config import DEFAULT_MODEL_NAME, Settings
    from sluice.engine.models import ensure_default_model

    ensure_default_model(Settings().cache_dir)
    work = Path(tempfile.mkdtemp(prefix="sluice-tracing-cpu-"))
    sink = OtlpSink().url
    targets = []
    for name in SERVERS:
        port = free_port()
        command = _command(port, args.tokens_per_s, ["-m", "sluice", "serve"])
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink,
            "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": RATIO[name],
        }
        targets.append(Target(name, command, port, env))
    print(f"server logs in {work}", flush=True)
    with running(targets, work) as processes:
        spec = LoadSpec(model=DEFAULT_MODEL_NAME, stream=True)
        cpu = {t.name: psutil.Process(p.pid) for t, p in zip(targets, processes, strict=True)}
        rows = run_all(targets, {name: spec for name in SERVERS}, cpu, args)
    report(
        rows,
        args.out,
        servers=SERVERS,
        baseline="untraced",
        title="sluice CPU per streamed token, tracing at 100% vs sampled out (synthetic engine)",
    )


if __name__ == "__main__":
    main()
