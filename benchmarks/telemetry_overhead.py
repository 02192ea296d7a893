"""The cost of telemetry: the same load on sluice with metrics, logs and tracing (100%
sampling, exported over OTLP to a local receiver) against sluice with telemetry off.

    .venv/bin/python benchmarks/telemetry_overhead.py --rounds 3

Every argument goes to `sluice bench` (default load: 16 concurrent streaming chats of up to
64 output tokens, 48 requests per run, 3 rounds).

Both servers run the default model with the same settings; only `SLUICE_TELEMETRY__*` and
the OTLP endpoint differ. Goal: telemetry costs at most 3% of throughput.
"""

from __future__ import annotations

import sys

from sluice.bench.compare import SERVING_LOAD, OtlpSink, Target, compare, free_port
from sluice.config import DEFAULT_MODEL_NAME


def main() -> None:
    sink = OtlpSink()
    on_port, off_port = free_port(), free_port()

    def serve(port: int) -> list[str]:
        return [sys.executable, "-m", "sluice", "serve", "--port", str(port)]

    targets = [
        Target(
            "telemetry-on",
            serve(on_port),
            on_port,
            {
                "SLUICE_TELEMETRY__TRACE_SAMPLE_RATIO": "1.0",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.url,
            },
        ),
        Target("telemetry-off", serve(off_port), off_port, {"SLUICE_TELEMETRY__ENABLED": "false"}),
    ]
    code = compare(targets, ["--model", DEFAULT_MODEL_NAME, *SERVING_LOAD, *sys.argv[1:]])
    print(f"\nOTLP exports received from telemetry-on: {sink.exports}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
