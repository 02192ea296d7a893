"""Prometheus metrics: the `sluice_*` families in a registry owned by one app.

Each app gets its own `CollectorRegistry`, so tests and several apps in one process never
share counters. Engine gauges are read at scrape time from `Engine.stats()`. vLLM registers
its own `vllm:*` metrics in prometheus_client's global registry; `/metrics` serves both.

Per-key labels carry the key's configured name (never its secret). They stay bounded: the
first `MAX_KEY_LABELS` names seen get their own series, later ones share `other`.

Buckets: time to first token and inter-token latency need resolution well under 100 ms;
end-to-end latency needs to reach minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sluice.backends.upstream import BREAKER_STATES
from sluice.config import PricingSettings
from sluice.engine.protocol import EngineStats
from sluice.gateway.alerts import BudgetCrossing
from sluice.gateway.quota import BudgetLeft, Limits
from sluice.telemetry.record import RequestRecord

# fmt: off
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5,
    7.5, 10, 20, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    1, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60,
    90, 120, 180, 300, 600)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# fmt: on
MAX_KEY_LABELS = 200
NO_KEY = "none"  # before authentication (a 401, a bad body)


class KeyLabels:
    """Bounded label values for key names."""

    def __init__(self, limit: int = MAX_KEY_LABELS) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, name: str | None) -> str:
        name = name or NO_KEY
        if name in self._seen:
            return name
        if len(self._seen) >= self.limit:
            return "other"
        self._seen.add(name)
        return name


class _BackendCollector(Collector):
    """Upstream gauges, read when Prometheus scrapes."""

    def __init__(self, states: Callable[[], dict[str, dict[str, object]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        breaker = GaugeMetricFamily(
            "sluice_circuit_breaker_state",
            "Each upstream's circuit breaker: 0 closed, 1 open, 2 half-open.",
            labels=["backend"],
        )
        up = GaugeMetricFamily(
            "sluice_backend_up", "1 while an upstream passes its health checks.", labels=["backend"]
        )
        outstanding = GaugeMetricFamily(
            "sluice_backend_outstanding_requests",
            "Requests in flight to each upstream.",
            labels=["backend"],
        )
        for name, state in self._states().items():
            breaker.add_metric([name], BREAKER_STATES.get(str(state["breaker"]), 0))
            up.add_metric([name], 1.0 if state["healthy"] else 0.0)
            outstanding.add_metric([name], float(str(state["outstanding"])))
        yield breaker
        yield up
        yield outstanding


@dataclass(frozen=True)
class SloSpec:
    """The latency objective: p95 end to end at most `latency_s` for requests of up to
    `max_prompt_tokens` prompt and `max_output_tokens` output tokens."""

    latency_s: float = 1.2
    max_prompt_tokens: int = 200
    max_output_tokens: int = 256
    ttft_s: float = 2.0  # p99 time to first token, for every generation request


class _EngineCollector(Collector):
    """Engine gauges, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats | None], model: Callable[[], str]):
        self._stats = stats
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        model = self._model()
        for name, doc, value in (
            ("sluice_engine_running", "Sequences the engine is running.", stats.running),
            ("sluice_engine_waiting", "Requests waiting in the engine's queue.", stats.waiting),
            ("sluice_engine_kv_cache_usage", "KV-cache usage (0-1).", stats.kv_cache_usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([model], value)
            yield family


class Metrics:
    """The app's metric families and how a finished request is recorded in them."""

    def __init__(self, slo: SloSpec | None = None, pricing: PricingSettings | None = None) -> None:
        self.slo = slo or SloSpec()
        self.pricing = pricing or PricingSettings()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_requests",
            "HTTP requests by outcome.",
            ["model", "endpoint", "status", "key"],
            registry=r,
        )
        self.latency = Histogram(
            "sluice_request_latency_seconds",
            "End-to-end request latency.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "sluice_inter_token_latency_seconds",
            "Time between generated tokens.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "sluice_queue_time_seconds",
            "Time a request waited in the engine's queue.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sluice_prompt_tokens", "Prompt tokens processed.", ["model", "key"], registry=r
        )
        self.generation_tokens = Counter(
            "sluice_generation_tokens", "Tokens generated.", ["model", "key"], registry=r
        )
        self.in_flight = Gauge(
            "sluice_in_flight_requests", "Generation requests being served.", registry=r
        )
        self.rejections = Counter(
            "sluice_rejections", "Requests refused, by reason.", ["reason", "key"], registry=r
        )
        self.store_failures = Counter(
            "sluice_store_failures",
            "Calls to the limits store (Redis) that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.admission_load = Gauge(
            "sluice_admission_load",
            "Engine queue as a share of the admission caps (1 = normal traffic is shed).",
            registry=r,
        )
        self.key_label = KeyLabels()
        self.slo_latency = Histogram(
            "sluice_slo_request_latency_seconds",
            f"End-to-end latency of requests the SLO covers (prompt <= "
            f"{self.slo.max_prompt_tokens}, output <= {self.slo.max_output_tokens} tokens).",
            ["model"],
            buckets=sorted({*LATENCY_BUCKETS, self.slo.latency_s}),
            registry=r,
        )
        self.slo_requests = Counter(
            "sluice_slo_requests",
            "Requests the latency objective covers, by whether they met it.",
            ["model", "outcome"],
            registry=r,
        )
        self.objective = Gauge(
            "sluice_objective_seconds",
            "The configured objectives (latency_p95: end to end, covered requests; ttft_p99).",
            ["objective"],
            registry=r,
        )
        self.objective.labels("latency_p95").set(self.slo.latency_s)
        self.objective.labels("ttft_p99").set(self.slo.ttft_s)
        self.ready = Gauge(
            "sluice_ready", "1 while the server serves requests (loaded, not draining).", registry=r
        )
        self.budget_remaining = Gauge(
            "sluice_budget_remaining",
            "What a key's budget has left in its window (spend and outstanding reservations "
            "counted), as of its last reservation, by unit (tokens, usd).",
            ["key", "unit"],
            registry=r,
        )
        self.budget_limit = Gauge(
            "sluice_budget_limit",
            "A key's budget per window, by unit.",
            ["key", "unit"],
            registry=r,
        )
        self.budget_alerts = Counter(
            "sluice_budget_alerts",
            "Budget thresholds crossed (once per key, unit, threshold and budget window).",
            ["key", "unit", "threshold"],
            registry=r,
        )
        self.cost = Counter(
            "sluice_cost_usd",
            "Cost of served tokens in USD (price table).",
            ["model", "key"],
            registry=r,
        )
        self.upstream_attempts = Counter(
            "sluice_upstream_attempts",
            "Requests sent to upstream backends, by backend, model, attempt (1 = first) and "
            "outcome, one per attempt (ok, client_closed, error, refused, or the failure: "
            "connect, timeout, status_5xx, status_429, status_503, status_4xx, stream_cut, "
            "bad_answer).",
            ["backend", "model", "attempt", "outcome"],
            registry=r,
        )
        self.static_fallbacks = Counter(
            "sluice_static_fallbacks",
            "Requests answered with a model's static fallback message (every backend failed).",
            ["model"],
            registry=r,
        )
        self.model_load = Gauge(
            "sluice_model_load_seconds",
            "Cold start: seconds the engine took to load the model.",
            ["model"],
            registry=r,
        )

    def watch_engine(
        self, stats: Callable[[], EngineStats | None], model: Callable[[], str]
    ) -> None:
        self.registry.register(_EngineCollector(stats, model))

    def observe(self, record: RequestRecord, finished_at: float) -> None:
        """Count a finished request in every family it belongs to."""
        model = record.model or "none"
        status = str(record.status or 500)
        key = self.key_label(record.key_name)
        self.requests.labels(model, record.endpoint, status, key).inc()
        self.latency.labels(model, record.endpoint).observe(finished_at - record.started)
        if record.status is not None and record.status >= 400 and record.error_code:
            self.rejections.labels(record.error_code, key).inc()
        if record.model is None:
            return
        if (
            record.status == 200
            and record.prompt_tokens <= self.slo.max_prompt_tokens
            and record.completion_tokens <= self.slo.max_output_tokens
        ):
            latency = finished_at - record.started
            self.slo_latency.labels(model).observe(latency)
            met = "met" if latency <= self.slo.latency_s else "missed"
            self.slo_requests.labels(model, met).inc()
        price = record.price or self.pricing.price_of(model)
        record.cost_usd = price.cost(record.prompt_tokens, record.completion_tokens)
        self.cost.labels(model, key).inc(record.cost_usd)
        if record.prompt_tokens:
            self.prompt_tokens.labels(model, key).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.generation_tokens.labels(model, key).inc(record.completion_tokens)
        if record.ttft_s is not None:
            self.ttft.labels(model).observe(record.ttft_s)
        if record.queue_s is not None:
            self.queue.labels(model).observe(record.queue_s)
        itl = self.itl.labels(model)
        for gap in record.token_gaps:
            itl.observe(gap)

    def upstream_attempt(self, backend: str, model: str, attempt: int, outcome: str) -> None:
        self.upstream_attempts.labels(backend, model, str(attempt), outcome).inc()

    def watch_backends(self, states: Callable[[], dict[str, dict[str, object]]]) -> None:
        """Breaker state, health and requests in flight of each upstream, at scrape time."""
        self.registry.register(_BackendCollector(states))

    def budget(self, key: str, limits: Limits, left: BudgetLeft) -> None:
        """A key's budgets after one of its reservations."""
        label = self.key_label(key)
        for unit, limit, remaining in (
            ("tokens", limits.budget_tokens, left.tokens),
            ("usd", limits.budget_usd, left.usd),
        ):
            if limit is not None and remaining is not None:
                self.budget_limit.labels(label, unit).set(limit)
                self.budget_remaining.labels(label, unit).set(remaining)

    def budget_alert(self, crossing: BudgetCrossing) -> None:
        self.budget_alerts.labels(
            self.key_label(crossing.key), crossing.unit, f"{crossing.threshold:g}"
        ).inc()

    def exposition(self) -> bytes:
        """Text format of sluice's families followed by vLLM's (global registry)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)
