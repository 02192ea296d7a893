"""The `sluice` command: `serve` and `model pull|path`.

Flags map onto `Settings` fields and win over environment variables and the YAML file; a flag
left out leaves the lower layers in charge. Expected failures (bad settings, a model that
cannot be provisioned) end with one sentence on stderr and exit status 2 or 1, not a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import (
    ModelProvisionError,
    check_hf_folder,
    default_model_dir,
    ensure_default_model,
    pull_default_model,
)

# flag -> (dotted settings path, argparse options)
SERVE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--config": ("config_file", {"type": Path, "help": "YAML settings file"}),
    "--model": ("model", {"help": "Hugging Face folder or hub id (default: SmolLM2-135M)"}),
    "--served-model-name": ("served_model_name", {"help": "model id clients use"}),
    "--host": ("host", {"help": "address to bind (default 127.0.0.1)"}),
    "--port": ("port", {"type": int, "help": "port (default 8000)"}),
    "--cache-dir": ("cache_dir", {"type": Path, "help": "where models are cached"}),
    "--log-level": ("log_level", {"choices": ["debug", "info", "warning", "error"]}),
    "--log-format": ("telemetry.log_format", {"choices": ["json", "text"]}),
    "--drain-timeout": ("drain_timeout_s", {"type": float, "help": "seconds SIGTERM waits"}),
    "--dtype": ("engine.dtype", {"help": "auto, float32, bfloat16, float16"}),
    "--max-model-len": ("engine.max_model_len", {"type": int, "help": "context length"}),
    "--kv-cache-gib": ("engine.kv_cache_gib", {"type": float, "help": "KV-cache size in GiB"}),
    "--gpu-memory-utilization": ("engine.gpu_memory_utilization", {"type": float}),
    "--max-num-seqs": ("engine.max_num_seqs", {"type": int, "help": "max concurrent sequences"}),
    "--max-num-batched-tokens": ("engine.max_num_batched_tokens", {"type": int}),
    "--enable-prefix-caching": (
        "engine.enable_prefix_caching",
        {"action": argparse.BooleanOptionalAction},
    ),
    "--enforce-eager": ("engine.enforce_eager", {"action": argparse.BooleanOptionalAction}),
    "--tensor-parallel-size": ("engine.tensor_parallel_size", {"type": int}),
    "--seed": ("engine.seed", {"type": int}),
    "--request-timeout": ("limits.request_timeout_s", {"type": float, "help": "seconds"}),
    "--max-tokens-cap": ("limits.max_tokens_cap", {"type": int}),
    "--max-n": ("limits.max_n", {"type": int}),
    "--max-body-bytes": ("limits.max_body_bytes", {"type": int}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    for flag, (_path, options) in SERVE_FLAGS.items():
        serve.add_argument(flag, dest=flag[2:].replace("-", "_"), default=None, **options)

    model = commands.add_parser("model", help="manage the default model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    pull = model_commands.add_parser("pull", help=f"fetch and convert {DEFAULT_MODEL_NAME}")
    pull.add_argument("--force", action="store_true", help="download and convert again")
    pull.add_argument("--cache-dir", type=Path, default=None)
    path = model_commands.add_parser("path", help="print the default model's folder")
    path.add_argument("--cache-dir", type=Path, default=None)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with every given flag on top of env, YAML and defaults."""
    overrides: dict[str, Any] = {}
    for flag, (path, _options) in SERVE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        node = overrides
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return Settings(**overrides)


def _fail(message: str, status: int) -> int:
    print(f"sluice: {message}", file=sys.stderr)
    return status


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]•[/] {message}")


def _resolve_model(settings: Settings) -> Settings:
    """Settings whose `model` is a concrete folder or hub id (the default pulled if needed)."""
    if settings.model is None:
        folder = ensure_default_model(settings.cache_dir, progress=_say)
        return settings.model_copy(
            update={
                "model": str(folder),
                "served_model_name": settings.served_model_name or DEFAULT_MODEL_NAME,
            }
        )
    candidate = Path(settings.model).expanduser()
    looks_local = candidate.exists() or settings.model.startswith((".", "/", "~"))
    if looks_local:
        check_hf_folder(candidate)
        return settings.model_copy(update={"model": str(candidate.resolve())})
    return settings


def serve(settings: Settings) -> int:
    from sluice.app import create_app
    from sluice.server import run
    from sluice.telemetry.logging import configure_logging

    configure_logging(settings.log_level, settings.telemetry.log_format)
    try:
        settings = _resolve_model(settings)
    except ModelProvisionError as exc:
        return _fail(str(exc), 1)
    app = create_app(settings)
    return run(app, settings.host, settings.port, settings.drain_timeout_s, settings.log_level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(settings_from_args(args))
        cache_dir = args.cache_dir or Settings().cache_dir
        if args.model_command == "path":
            print(default_model_dir(cache_dir))
            return 0
        pull_default_model(cache_dir, force=args.force, progress=_say)
        return 0
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return _fail(f"invalid setting {where}: {first['msg']}", 2)
    except (FileNotFoundError, ModelProvisionError) as exc:
        return _fail(str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
