"""CPU of sluice's process per streamed token with tracing at 100% sampling (exported over
OTLP/HTTP) against tracing sampled out, on the synthetic engine, in turns, in one run.

    .venv/bin/python benchmarks/tracing_cpu.py --out docs/benchmarks/tracing

Two `sluice serve --engine synthetic` processes (no weights: the engine is a timer, so the
process's CPU is sluice's own and token rates are far above a CPU model's), the same
per-request metrics and JSON log line on both:

- traced: `SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO=1.0`, every span exported over OTLP/HTTP to
  a sink in this script;
- untraced: ratio 0 (spans are created non-recording, nothing is exported).

Load: streaming chats of 128 output tokens at 32 concurrent (two waves), 3 rounds, CPU time
(user + system) of each server process divided by the tokens streamed. The goal (issue
12): tracing costs at most 3% CPU per streamed token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil
from frontend_cpu import report, run_all

from sluice.bench.compare import OtlpSink, Target, free_port, running
from sluice.bench.load import LoadSpec
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import ensure_default_model

SERVERS = ("traced", "untraced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="32")
    parser.add_argument("--waves", type=int, default=2, help="requests per stream slot")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="per sequence")
    parser.add_argument("--out", type=Path, default=Path("bench-results/tracing"))
    args = parser.parse_args()

    ensure_default_model(Settings().cache_dir)  # the synthetic engine's tokenizer
    work = Path(tempfile.mkdtemp(prefix="sluice-tracing-cpu-"))
    sink = OtlpSink().url
    targets = []
    for name, ratio in (("traced", "1.0"), ("untraced", "0.0")):
        port = free_port()
        command = [sys.executable, "-m", "sluice", "serve", "--port", str(port)]
        command += ["--engine", "synthetic", "--served-model-name", DEFAULT_MODEL_NAME]
        command += ["--synthetic-tokens-per-s", str(args.tokens_per_s)]
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink,
            "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": ratio,
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
