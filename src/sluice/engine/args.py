"""vLLM's `serve` arguments: the namespace vLLM's own parser makes of sluice's settings.

Every engine and OpenAI-frontend option of `vllm serve` reaches vLLM without sluice mapping
it: the `vllm:` section of the settings (YAML keys as in vLLM's own `--config` file, or
`SLUICE_VLLM__NAME=value` variables whose values are read as YAML scalars) and the vLLM
flags on sluice's command line are handed to vLLM's parser (`make_arg_parser`), which
converts and validates them as `vllm serve` does, then to `validate_parsed_serve_args`.
Precedence, lowest first: sluice's platform defaults (float32 and eager mode on CPU, the
priority scheduler, prompt-token details, SSE keep-alive comments every 15 s), the `vllm:`
section, command-line flags.

Refused with a sentence: the options of vLLM's own HTTP server, which sluice replaces (TLS,
vLLM's API key, uvicorn, several API server processes, ...). vLLM's CORS options
(`--allowed-origins`, `--allowed-methods`, `--allowed-headers`, `--allow-credentials`) are
taken, with vLLM's defaults, and applied by the app (app.py, `cors_options`). Source of the option
names: vllm/entrypoints/launchers/cli_args.py (`FrontendArgs`, `make_arg_parser`).
"""

from __future__ import annotations

import functools
import tempfile
from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

SSE_KEEP_ALIVE_S = 15

# vLLM HTTP-server options sluice does not take, each with what to do instead.
SERVER_ONLY: dict[str, str] = {
    "api_key": "sluice has its own API keys: 'sluice keys create NAME' or a keys file",
    "ssl_keyfile": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "ssl_certfile": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "ssl_ca_certs": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "ssl_cert_reqs": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "ssl_ciphers": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "enable_ssl_refresh": "terminate TLS in front of sluice (ingress, load balancer or proxy)",
    "uds": "sluice listens on --host and --port",
    "root_path": "serve sluice at the root of its host, or rewrite paths in a proxy",
    "middleware": "sluice's request path is fixed; see docs/architecture.md",
    "uvicorn_log_level": "use sluice's --log-level",
    "disable_uvicorn_access_log": "sluice writes one JSON log line per request instead",
    "disable_access_log_for_endpoints": "sluice writes one JSON log line per request instead",
    "enable_request_id_headers": "sluice always echoes x-request-id",
    "disable_fastapi_docs": "sluice serves /docs and /openapi.json for its own routes",
    "enable_offline_docs": "sluice serves /docs and /openapi.json for its own routes",
    "api_server_count": "one sluice process serves the engine; scale out with replicas",
    "headless": "one sluice process serves the engine; scale out with replicas",
    "grpc": "sluice serves HTTP only",
    "grpc_port": "sluice serves HTTP only",
    "enable_server_load_tracking": "sluice reports load in /readyz and /metrics",
    "enable_tokenizer_info_endpoint": "sluice serves /tokenize and /detokenize only",
    "tokens_only": "sluice serves the OpenAI routes",
    "enable_scale_out": "sluice serves the OpenAI routes",
    "h11_max_incomplete_event_size": "sluice runs its own HTTP server settings",
    "h11_max_header_count": "sluice runs its own HTTP server settings",
}


class EngineArgumentError(Exception):
    """vLLM's parser or its checks refused the options; `str(exc)` says which and why."""


@functools.cache
def vllm_parser() -> Any:
    """vLLM's `vllm serve` parser (built once: it registers hundreds of options)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):  # type: ignore[misc]
        def error(self, message: str) -> Any:
            raise EngineArgumentError(message)

    return make_arg_parser(Parser(prog="sluice serve", add_help=False))


def settings_to_argv(parser: Any, options: Mapping[str, Any]) -> list[str]:
    """The `vllm:` settings section as command-line flags, converted by vLLM's own
    config-file reader (`FlexibleArgumentParser.load_config_file`)."""
    if not options:
        return []
    values = {
        key.replace("_", "-"): yaml.safe_load(value) if isinstance(value, str) else value
        for key, value in options.items()
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle)
        handle.flush()
        argv: list[str] = parser.load_config_file(handle.name)
    return argv


def engine_namespace(
    model: str,
    *,
    served_model_names: Sequence[str] = (),
    defaults: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    cli_args: Sequence[str] = (),
    on_cpu: bool = True,
) -> Namespace:
    """vLLM's `serve` namespace for `model` (a hub id or a folder).

    `served_model_names` and `defaults` (flags) are sluice's defaults for this model, which
    the user's own flags override; `options` is the `vllm:` settings section and `cli_args`
    the vLLM flags from the command line. Raises `EngineArgumentError` for anything vLLM's
    parser or checks refuse, and for vLLM HTTP-server options sluice does not take.
    """
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = vllm_parser()
    # OpenAI reports usage.prompt_tokens_details.cached_tokens on every response; a stream
    # that waits sends an SSE comment every 15 s (sse-starlette's default), well inside the
    # idle timeouts of the proxies sluice is deployed behind (docs/deploy.md).
    platform: list[str] = [
        "--scheduling-policy",
        "priority",
        "--enable-prompt-tokens-details",
        "--sse-keep-alive-interval",
        str(SSE_KEEP_ALIVE_S),
    ]
    if on_cpu:
        # bf16 has no native support on these CPUs (batched throughput collapses) and graph
        # capture costs start-up time for no gain (measured on 2-core x86 CPUs).
        platform += ["--dtype", "float32", "--enforce-eager"]
    if served_model_names:
        platform += ["--served-model-name", *served_model_names]
    argv = [
        *platform,
        *defaults,
        *settings_to_argv(parser, options or {}),
        *cli_args,
        "--model",
        model,
    ]
    args: Namespace = parser.parse_args(argv)
    if args.model_tag not in (None, model):
        raise EngineArgumentError(
            f"two models given: '{args.model_tag}' and '{model}'; give one, positionally"
        )
    refused = [
        name
        for name, advice in SERVER_ONLY.items()
        if hasattr(args, name) and getattr(args, name) != parser.get_default(name)
    ]
    if refused:
        name = refused[0]
        raise EngineArgumentError(
            f"sluice serve does not take vLLM's --{name.replace('_', '-')}: {SERVER_ONLY[name]}"
        )
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineArgumentError(str(exc).removeprefix("Error: ")) from exc
    return args


def model_in(cli_args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The model named positionally among vLLM's flags (`sluice serve MODEL ...`), and the
    flags without it; `(None, flags)` when none is given."""
    args = vllm_parser().parse_args(list(cli_args))
    tag: str | None = args.model_tag
    if tag is None:
        return None, list(cli_args)
    rest = list(cli_args)
    rest.remove(tag)
    return tag, rest
