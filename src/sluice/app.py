"""The app factory: `create_app(settings, engine=None)` builds a FastAPI app whose lifespan
puts everything on `app.state` (settings, engine, lifecycle, job runner).

The engine loads in a background task so `/healthz` answers and `/readyz` says 503 while the
model loads; a watchdog turns an engine failure into a dead lifecycle (503 everywhere and a
non-zero exit, so a supervisor restarts the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Status, StatusCode

from sluice import __version__
from sluice.api.admin import router as admin_router
from sluice.api.middleware import (
    BodyLimitMiddleware,
    ObservabilityMiddleware,
    RequestIdMiddleware,
)
from sluice.api.routes import router
from sluice.api.run import JobRunner
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.protocol import Engine
from sluice.errors import install_error_handlers
from sluice.gateway.admission import Admission
from sluice.gateway.service import Gateway
from sluice.gateway.store_redis import StoreFailure
from sluice.lifecycle import Lifecycle, Phase
from sluice.telemetry.metrics import Metrics, SloSpec
from sluice.telemetry.tracing import ErrorBiasedSampler, ErrorRateWindow, build_tracer_provider

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 1.0


def build_engine(settings: Settings) -> Engine:
    """The engine `settings` ask for (imported lazily: vLLM is heavy)."""
    if settings.engine.kind == "synthetic":
        from sluice.engine.synthetic import SyntheticEngine

        return SyntheticEngine(settings)
    from sluice.engine.vllm import VllmEngine

    return VllmEngine(settings)


async def _load(
    engine: Engine, lifecycle: Lifecycle, metrics: Metrics, tracer: trace.Tracer
) -> None:
    started = time.monotonic()
    with tracer.start_as_current_span("load_model") as span:
        span.add_event("start_load_model")
        try:
            await engine.start()
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "engine start-up failed"))
            logger.error("the engine could not start: %s", exc, exc_info=True)
            lifecycle.fail(f"engine start-up failed: {exc}")
            return
        span.add_event("end_load_model")
        span.set_attribute("gen_ai.request.model", engine.model_card().id)
    seconds = time.monotonic() - started
    lifecycle.loaded(seconds)
    metrics.model_load.labels(engine.model_card().id).set(seconds)
    logger.info("model %s loaded in %.1fs (cold start)", engine.model_card().id, seconds)


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


def served_model_name(settings: Settings) -> str:
    """The model id clients will use, known before the engine loads."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.engine.kind == "synthetic":
        return "synthetic"
    return Path(settings.model).name if settings.model else DEFAULT_MODEL_NAME


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """A sluice app for `settings`; pass `engine` to use one other than vLLM (tests), and
    `span_exporter` to receive spans without OTLP (tests)."""
    telemetry = settings.telemetry
    errors = ErrorRateWindow(telemetry.error_window_s)
    tracer_provider = build_tracer_provider(
        model=served_model_name(settings),
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
        the_engine = engine if engine is not None else build_engine(settings)
        lifecycle = Lifecycle()
        app.state.settings = settings
        app.state.engine = the_engine
        app.state.lifecycle = lifecycle
        app.state.runner = JobRunner(
            the_engine, lifecycle, settings.limits.request_timeout_s, tracer=tracer
        )
        engine_stats = lambda: the_engine.stats() if the_engine.ready else None  # noqa: E731
        admission = Admission(settings.admission, engine_stats)
        gateway = Gateway.build(
            settings,
            admission,
            on_store_failure=lambda op: metrics.store_failures.labels(op).inc(),
        )
        app.state.gateway = gateway
        metrics.admission_load.set_function(admission.load)
        await _announce_auth(gateway, settings)
        metrics.in_flight.set_function(lambda: lifecycle.in_flight)
        metrics.watch_engine(engine_stats, lambda: the_engine.model_card().id)
        tasks = [
            asyncio.create_task(_load(the_engine, lifecycle, metrics, tracer), name="sluice-load"),
            asyncio.create_task(_watch_health(the_engine, lifecycle), name="sluice-health"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await the_engine.shutdown()
            await gateway.close()
            tracer_provider.shutdown()

    metrics = Metrics(
        SloSpec(
            telemetry.slo_latency_s,
            telemetry.slo_max_prompt_tokens,
            telemetry.slo_max_output_tokens,
        ),
        settings.pricing,
    )
    app = FastAPI(title="sluice", version=__version__, lifespan=lifespan)
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    # Added innermost first: request id → record (metrics, log line) → body limit → routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    if telemetry.enabled:
        app.add_middleware(ObservabilityMiddleware, metrics=metrics, errors=errors)
    app.add_middleware(RequestIdMiddleware)
    if telemetry.enabled:
        # The server span wraps everything above; incoming `traceparent` headers are honoured.
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=tracer_provider, excluded_urls="healthz,readyz,metrics"
        )
    return app
