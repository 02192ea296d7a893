"""OpenTelemetry tracing: one tracer provider per app, the GenAI generation span, and the
error-biased sampler.

Export is OTLP over HTTP, configured by the standard `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, headers, timeout);
with neither set, or with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`, nothing
is exported. An incoming `traceparent` joins the caller's trace (W3C trace context).

Sampling rule: a request that arrives with a sampled parent is sampled (parent-based); a new
trace is sampled with probability `trace_sample_ratio`, except while the error rate over the
last `error_window_s` seconds is above `error_rate_threshold` (with at least
`error_min_requests` requests in the window): then every new trace is sampled, until the rate
falls back under the threshold. Errors are responses with status 500 or above (server-side
failures, timeouts, overload), not client mistakes.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from sluice import __version__

Clock = Callable[[], float]


class ErrorRateWindow:
    """Outcomes over the last `window_s` seconds (time injected for tests)."""

    def __init__(self, window_s: float, clock: Clock = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._events: collections.deque[tuple[float, bool]] = collections.deque()
        self._errors = 0

    def observe(self, error: bool) -> None:
        self._expire()
        self._events.append((self.clock(), error))
        self._errors += error

    def counts(self) -> tuple[int, int]:
        """(errors, total) within the window."""
        self._expire()
        return self._errors, len(self._events)

    def _expire(self) -> None:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            _, error = self._events.popleft()
            self._errors -= error


class ErrorBiasedSampler(Sampler):
    """Root sampler: a ratio normally, everything while the recent error rate is high."""

    def __init__(
        self, ratio: float, window: ErrorRateWindow, threshold: float, min_requests: int
    ) -> None:
        self.ratio_sampler = TraceIdRatioBased(ratio)
        self.window = window
        self.threshold = threshold
        self.min_requests = min_requests

    def elevated(self) -> bool:
        errors, total = self.window.counts()
        return total >= self.min_requests and errors / total > self.threshold

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.elevated():
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self.ratio_sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"ErrorBiased{{{self.ratio_sampler.get_description()},{self.threshold}}}"


def otlp_configured() -> bool:
    """True when the standard OTEL_* variables ask for OTLP trace export."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def build_tracer_provider(
    *,
    model: str,
    sampler: Sampler,
    exporter: SpanExporter | None,
) -> TracerProvider:
    """A provider for one app; `exporter=None` and no OTLP configuration records nothing."""
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "sluice"),
            "service.version": __version__,
            "sluice.model": model,
        }
    )
    provider = TracerProvider(resource=resource, sampler=ParentBased(root=sampler))
    if exporter is None and otlp_configured():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# Paths without a server span (probes, the scrape, the version); the request middleware
# leaves the same ones out of metrics and the log line.
UNTRACED_PATHS = ("healthz", "health", "readyz", "metrics", "version")


def instrument(app: FastAPI, tracer_provider: TracerProvider) -> None:
    """The server span of every request but probes (OpenTelemetry's FastAPI instrumentation;
    an incoming `traceparent` joins the caller's trace). One span per request, none per ASGI
    message: the per-message spans (one per SSE chunk, hundreds per answer) would cost CPU
    on the hot path and room in the tracing backend."""
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        excluded_urls=",".join(UNTRACED_PATHS),
        exclude_spans=["receive", "send"],
    )


class GenerationSpan:
    """The GenAI child span of one generation (`chat {model}` / `text_completion {model}`)."""

    def __init__(
        self,
        tracer: trace.Tracer,
        parent: Context | None,
        attributes: dict[str, Any],
        operation: str,
        model: str,
    ) -> None:
        self.span: Span = tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        self.span.add_event("start_generate")
        self._first = True

    def on_delta(self) -> None:
        if self._first:
            self._first = False
            self.span.add_event("first_token")

    def finish(
        self,
        *,
        response_id: str,
        input_tokens: int,
        output_tokens: int,
        finish_reasons: list[str],
        error: BaseException | None,
    ) -> None:
        self.span.set_attributes(
            {
                "gen_ai.response.id": response_id,
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "gen_ai.response.finish_reasons": finish_reasons,
            }
        )
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.add_event("end_generate")
        self.span.end()
