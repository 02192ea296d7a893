"""The error-biased sampler with an injected clock."""

from __future__ import annotations

from opentelemetry.sdk.trace.sampling import Decision

from sluice.telemetry.tracing import (
    ErrorBiasedSampler,
    ErrorRateWindow,
    build_tracer_provider,
    otlp_configured,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def decide(sampler: ErrorBiasedSampler, trace_id: int = 0xFFFF_FFFF_FFFF_FFFF) -> Decision:
    return sampler.should_sample(None, trace_id, "span").decision


def test_window_counts_and_expires() -> None:
    clock = Clock()
    window = ErrorRateWindow(60, clock)
    window.observe(True)
    window.observe(False)
    assert window.counts() == (1, 2)
    clock.now += 61
    window.observe(False)
    assert window.counts() == (0, 1)


def test_ratio_zero_drops_until_errors_pass_the_threshold_then_falls_back() -> None:
    clock = Clock()
    window = ErrorRateWindow(60, clock)
    sampler = ErrorBiasedSampler(0.0, window, threshold=0.1, min_requests=10)
    for _ in range(10):
        window.observe(False)
    assert decide(sampler) is Decision.DROP
    window.observe(True)  # 1/11 = 9%: not above 10%
    assert decide(sampler) is Decision.DROP
    window.observe(True)  # 2/12 = 17%
    assert decide(sampler) is Decision.RECORD_AND_SAMPLE
    clock.now += 61  # the errors leave the window
    window.observe(False)
    assert decide(sampler) is Decision.DROP


def test_too_few_requests_do_not_elevate() -> None:
    window = ErrorRateWindow(60, Clock())
    sampler = ErrorBiasedSampler(0.0, window, threshold=0.1, min_requests=10)
    for _ in range(5):
        window.observe(True)
    assert decide(sampler) is Decision.DROP


def test_ratio_one_samples_everything() -> None:
    sampler = ErrorBiasedSampler(1.0, ErrorRateWindow(60, Clock()), 0.1, 10)
    assert decide(sampler, trace_id=1) is Decision.RECORD_AND_SAMPLE


def test_otlp_is_off_without_configuration(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not otlp_configured()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert otlp_configured()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not otlp_configured()


def test_provider_without_exporter_or_otlp_has_no_processor(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    sampler = ErrorBiasedSampler(1.0, ErrorRateWindow(60, Clock()), 0.1, 10)
    provider = build_tracer_provider(model="m", sampler=sampler, exporter=None)
    # Spans are created but go nowhere: nothing is configured to receive them.
    assert provider._active_span_processor._span_processors == ()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    exporting = build_tracer_provider(model="m", sampler=sampler, exporter=None)
    assert len(exporting._active_span_processor._span_processors) == 1
    exporting.shutdown()
