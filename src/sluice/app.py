"""The app factory: `create_app(settings, engine=None)` builds a FastAPI app whose lifespan
puts everything on `app.state` (settings, engine, lifecycle, gateway, tracer, and vLLM's
serving objects once the engine is up).

The engine loads in a background task so `/healthz` answers and `/readyz` says 503 while the
packaged default model is pulled (first start only) and while the model loads; then vLLM's
OpenAI serving layer is built on it (api/serving.py). A watchdog
turns an engine failure into a dead lifecycle (503 everywhere and a non-zero exit, so a
supervisor restarts the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Status, StatusCode
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from sluice import __version__
from sluice.api.admin import router as admin_router
from sluice.api.middleware import (
    BodyLimitMiddleware,
    RequestMiddleware,
)
from sluice.api.routes import openapi_routes, router
from sluice.api.serving import Serving
from sluice.api.sse import SERVER_SEND
from sluice.backends.proxy import RetryBudget
from sluice.backends.registry import Backends
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.base import freeze_startup_heap, in_daemon_thread
from sluice.engine.models import (
    default_model_dir,
    ensure_default_model,
    is_packaged_model,
    is_provisioned,
    local_or_hub_model,
)
from sluice.engine.protocol import Engine
from sluice.errors import install_error_handlers
from sluice.gateway.admission import Admission
from sluice.gateway.service import Gateway
from sluice.gateway.store_redis import StoreFailure
from sluice.lifecycle import Lifecycle, Phase
from sluice.telemetry.logging import resolved_format
from sluice.telemetry.metrics import Metrics, SloSpec
from sluice.telemetry.tracing import (
    ErrorBiasedSampler,
    ErrorRateWindow,
    build_tracer_provider,
    instrument,
)

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 1.0


# Set before vLLM starts, only where the user has not set them.
PROCESS_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
CPU_DEFAULT_KV_CACHE_GIB = 1
SYNTHETIC_MODEL_NAME = "synthetic"
# The default model has no tool format of its own: serve it with a Hermes-style template and
# vLLM's hermes parser, so tool-calling clients (instructor, pydantic-ai, LangChain) work.
DEFAULT_MODEL_TOOLS = [
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
    "--chat-template",
    str(Path(__file__).parent / "engine" / "templates" / "smollm2_tools.jinja"),
]


def build_engine(settings: Settings, cli_args: Sequence[str] = ()) -> Engine:
    """The engine `settings` ask for, with vLLM's options from the `vllm:` settings and
    `cli_args` (engine/args.py). `settings.model=None` means the packaged default model (its
    folder must have been pulled): served as `SmolLM2-135M-Instruct`, offline. So is a
    `settings.model` folder that holds a copy of it (`is_packaged_model`: the CPU image bakes
    one outside the cache volume); any other model is served by its id exactly as given.

    Raises `EngineArgumentError` for options vLLM refuses and `ModelProvisionError` for a
    model that cannot be had (engine/models.py). Imports vLLM (seconds).
    """
    from vllm.platforms import current_platform

    from sluice.engine.args import engine_namespace

    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    on_cpu = bool(current_platform.is_cpu())
    if on_cpu:
        # vLLM's CPU backend sizes its KV cache from this variable; its default asks for more
        # memory than the NUMA node reports and start-up fails (measured here).
        gib = settings.engine.kv_cache_gib or CPU_DEFAULT_KV_CACHE_GIB
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(gib))))
    synthetic = settings.engine.kind == "synthetic"
    names: list[str] = []
    defaults: list[str] = []
    if resolved_format(settings.telemetry.log_format) == "json":
        defaults.append("--no-use-tqdm-on-load")  # a progress bar is not a log line
    if settings.model is None or is_packaged_model(settings.model):
        model = settings.model or str(default_model_dir(settings.cache_dir))
        names = [DEFAULT_MODEL_NAME]
        defaults += DEFAULT_MODEL_TOOLS
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model needs no hub
    else:
        model = settings.model
        names = [model]  # the id exactly as given, even when a cached snapshot is loaded
    if synthetic:
        names = [SYNTHETIC_MODEL_NAME]
    args = engine_namespace(
        model,
        served_model_names=names,
        defaults=defaults,
        options=settings.vllm,
        cli_args=cli_args,
        on_cpu=on_cpu,
    )
    if settings.model is not None:
        args.model = local_or_hub_model(settings.model, args.revision)
    if synthetic:
        from sluice.engine.synthetic import SyntheticEngine

        return SyntheticEngine(args, settings.engine.synthetic_tokens_per_s)
    from sluice.engine.vllm import VllmEngine

    return VllmEngine(args)


async def _load(app: FastAPI, engine: Engine, metrics: Metrics, tracer: trace.Tracer) -> None:
    lifecycle: Lifecycle = app.state.lifecycle
    model = engine.served_model_names[0]
    started = time.monotonic()
    with tracer.start_as_current_span("load_model") as span:
        span.add_event("start_load_model")
        try:
            await _provision_default_model(engine, app.state.settings, lifecycle)
            lifecycle.step = "loading model"
            await engine.start()
            app.state.serving = await Serving.build(engine)
            app.state.backends.local_context = int(
                app.state.serving.models.engine_client.model_config.max_model_len
            )
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "engine start-up failed"))
            logger.error("the engine could not start: %s", exc, exc_info=True)
            lifecycle.fail(f"engine start-up failed: {exc}")
            return
        span.add_event("end_load_model")
        span.set_attribute("gen_ai.request.model", model)
    seconds = time.monotonic() - started
    freeze_startup_heap()  # as `vllm serve` does once it has started
    lifecycle.loaded(seconds)
    metrics.model_load.labels(model).set(seconds)
    logger.info("model %s loaded in %.1fs (cold start)", model, seconds)


async def _provision_default_model(
    engine: Engine, settings: Settings, lifecycle: Lifecycle
) -> None:
    """Pull the packaged default model if `engine` serves it and it is not cached yet (the
    port is already open, so `/readyz` says `pulling model` meanwhile). Raises
    `ModelProvisionError`."""
    folder = default_model_dir(settings.cache_dir)
    if Path(engine.args.model) != folder or is_provisioned(folder):
        return
    lifecycle.step = "pulling model"
    logger.info("pulling the default model %s (first start only)", DEFAULT_MODEL_NAME)
    await in_daemon_thread(
        lambda: ensure_default_model(settings.cache_dir, progress=logger.info), "sluice-pull"
    )


async def _watch_health(engine: Engine, lifecycle: Lifecycle) -> None:
    while lifecycle.phase is not Phase.DEAD:
        await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)
        if not engine.ready:
            continue
        try:
            await engine.check_health()
        except Exception as exc:
            lifecycle.fail(f"engine health check failed: {exc}")


async def _announce_auth(gateway: Gateway, settings: Settings) -> None:
    """Say at start-up whether requests need a key (the CLI refuses unsafe binds before)."""
    try:
        required = await gateway.keys.required()
    except StoreFailure as exc:
        logger.warning("cannot reach the limits store to count API keys: %s", exc)
        return
    if required:
        logger.info("API keys required (store: %s)", settings.gateway.store)
    else:
        logger.warning(
            "no API keys configured: serving without authentication on %s only; create a "
            "key with 'sluice keys create NAME' to require one",
            settings.host,
        )


class SluiceApp(FastAPI):
    """FastAPI that hands the server's own `send` to streams (in the scope, `SERVER_SEND`):
    the chunks of a stream then skip the middleware chain's per-message wrappers, while its
    first and last messages still pass through it (api/sse.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """A sluice app for `settings`; `engine` defaults to `build_engine(settings)`; pass
    `span_exporter` to receive spans without OTLP (tests)."""
    the_engine = engine if engine is not None else build_engine(settings)
    model = the_engine.served_model_names[0]
    backends = Backends(settings, the_engine.served_model_names)  # ValueError: bad routing
    telemetry = settings.telemetry
    errors = ErrorRateWindow(telemetry.error_window_s)
    tracer_provider = build_tracer_provider(
        model=model,
        sampler=ErrorBiasedSampler(
            telemetry.trace_sample_ratio,
            errors,
            telemetry.error_rate_threshold,
            telemetry.error_min_requests,
        ),
        exporter=span_exporter,
    )
    tracer: trace.Tracer = (
        tracer_provider.get_tracer("sluice", __version__)
        if telemetry.enabled
        else trace.NoOpTracer()
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle = Lifecycle()
        app.state.settings = settings
        app.state.engine = the_engine
        app.state.lifecycle = lifecycle
        app.state.tracer = tracer
        app.state.serving = None
        app.state.backends = backends
        app.state.retry_budget = RetryBudget(settings.routing.retry_budget)
        backends.start()
        metrics.watch_backends(backends.states)
        engine_stats = lambda: the_engine.stats() if the_engine.ready else None  # noqa: E731
        admission = Admission(settings.admission, engine_stats)
        gateway = Gateway.build(
            settings,
            admission,
            on_store_failure=lambda op: metrics.store_failures.labels(op).inc(),
            on_budget=metrics.budget,
            on_budget_alert=metrics.budget_alert,
        )
        app.state.gateway = gateway
        metrics.admission_load.set_function(admission.load)
        await _announce_auth(gateway, settings)
        metrics.in_flight.set_function(lambda: lifecycle.in_flight)
        metrics.ready.set_function(lambda: float(lifecycle.phase is Phase.READY))
        metrics.watch_engine(engine_stats, lambda: model)
        tasks = [
            asyncio.create_task(_load(app, the_engine, metrics, tracer), name="sluice-load"),
            asyncio.create_task(_watch_health(the_engine, lifecycle), name="sluice-health"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Spend first (the settlement backlog's last flush): a platform that kills the
            # process during the engine's shutdown must not take unrecorded spend with it.
            await gateway.close()
            await backends.close()
            await the_engine.shutdown()
            tracer_provider.shutdown()

    metrics = Metrics(
        SloSpec(
            telemetry.slo_latency_s,
            telemetry.slo_max_prompt_tokens,
            telemetry.slo_max_output_tokens,
            telemetry.slo_ttft_s,
        ),
        settings.pricing,
    )
    app = SluiceApp(title="sluice", version=__version__, lifespan=lifespan)
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title, version=app.version, routes=openapi_routes(app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Added innermost first: request id and record (metrics, log line) → body limit → routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    if telemetry.enabled:
        app.add_middleware(
            RequestMiddleware, metrics=metrics, errors=errors, on_record=backends.observe
        )
    else:
        app.add_middleware(RequestMiddleware)  # the request id only
    if telemetry.enabled:
        instrument(app, tracer_provider)  # the server span wraps everything above
    cors = cors_options(the_engine)
    if cors["allow_origins"]:
        # Outermost: a browser's preflight is answered here (no key, no log line), and every
        # answer, errors included, carries the CORS headers a page needs to read it.
        app.add_middleware(CORSMiddleware, **cors)
    return app


def cors_options(engine: Engine) -> dict[str, Any]:
    """Starlette's `CORSMiddleware` options from vLLM's CORS flags as the engine's namespace
    holds them, as vLLM's own `build_app` applies them. vLLM 0.32's defaults allow no
    origin (then no middleware is installed: no CORS headers, as `vllm serve`), and every
    method and header, without credentials, once origins are given."""
    args = getattr(engine, "args", None)
    return {
        "allow_origins": list(getattr(args, "allowed_origins", None) or []),
        "allow_credentials": bool(getattr(args, "allow_credentials", False)),
        "allow_methods": list(getattr(args, "allowed_methods", None) or ["*"]),
        "allow_headers": list(getattr(args, "allowed_headers", None) or ["*"]),
    }
