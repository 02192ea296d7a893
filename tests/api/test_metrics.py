"""`/metrics` and the per-request record: sluice's families, labels and values."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sluice.telemetry.metrics import Metrics
from tests.api.conftest import app_client, chat_body, completion_body, make_settings
from tests.fake_engine import MODEL_ID, FakeEngine


def metrics_of(client: TestClient) -> Metrics:
    metrics: Metrics = client.app.state.metrics  # type: ignore[attr-defined]
    return metrics


KEYED = {
    "sluice_requests_total",
    "sluice_prompt_tokens_total",
    "sluice_generation_tokens_total",
    "sluice_cost_usd_total",
    "sluice_rejections_total",
}


def sample(client: TestClient, name: str, **labels: str) -> float | None:
    """A sample's value; keyed families default to the open server's `anonymous` key."""
    if name in KEYED and "key" not in labels:
        labels["key"] = "anonymous"
    return metrics_of(client).registry.get_sample_value(name, labels)


def test_successful_completion_is_counted_everywhere(client: TestClient) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=4))
    assert response.status_code == 200
    ok = {"model": MODEL_ID, "endpoint": "/v1/completions", "status": "200"}
    assert sample(client, "sluice_requests_total", **ok) == 1
    assert sample(client, "sluice_prompt_tokens_total", model=MODEL_ID) == 3  # "one two three"
    assert sample(client, "sluice_generation_tokens_total", model=MODEL_ID) == 4
    assert sample(client, "sluice_time_to_first_token_seconds_count", model=MODEL_ID) == 1
    # four tokens arrive one by one: three gaps between them
    assert sample(client, "sluice_inter_token_latency_seconds_count", model=MODEL_ID) == 3
    assert (
        sample(
            client,
            "sluice_request_latency_seconds_count",
            model=MODEL_ID,
            endpoint="/v1/completions",
        )
        == 1
    )


def test_objectives_readiness_and_slo_outcomes_are_exported(engine: FakeEngine) -> None:
    settings = make_settings(telemetry={"slo_latency_s": 30.0, "slo_ttft_s": 0.5})
    with app_client(engine, settings) as client:
        assert client.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200
        assert sample(client, "sluice_objective_seconds", objective="latency_p95") == 30.0
        assert sample(client, "sluice_objective_seconds", objective="ttft_p99") == 0.5
        assert sample(client, "sluice_ready") == 1
        assert sample(client, "sluice_slo_requests_total", model=MODEL_ID, outcome="met") == 1
        assert sample(client, "sluice_slo_requests_total", model=MODEL_ID, outcome="missed") is None


def test_stream_is_counted_with_its_tokens(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    assert response.status_code == 200
    labels = {"model": MODEL_ID, "endpoint": "/v1/chat/completions", "status": "200"}
    assert sample(client, "sluice_requests_total", **labels) == 1
    assert sample(client, "sluice_generation_tokens_total", model=MODEL_ID) == 5


def test_refusals_are_counted_by_reason_with_bounded_labels(client: TestClient) -> None:
    client.post("/v1/completions", json=completion_body(model="nope"))
    client.post("/v1/completions", json=completion_body(temperature=7))
    long_prompt = " ".join(["word"] * 520)  # over the fake's context of 512
    client.post("/v1/completions", json=completion_body(prompt=long_prompt, max_tokens=60))
    assert sample(client, "sluice_rejections_total", reason="model_not_found") == 1
    assert sample(client, "sluice_rejections_total", reason="invalid_request_error") == 1
    assert sample(client, "sluice_rejections_total", reason="context_length_exceeded") == 1
    unknown_model = {"model": "none", "endpoint": "/v1/completions", "status": "404"}
    assert sample(client, "sluice_requests_total", **unknown_model) == 1


def test_error_inside_a_stream_counts_its_status() -> None:
    engine = FakeEngine(token_delay_s=0.05)
    settings = make_settings(limits={"request_timeout_s": 0.2})
    with app_client(engine, settings) as client:
        response = client.post("/v1/completions", json=completion_body(max_tokens=50, stream=True))
        assert response.status_code == 200
        assert "request_timeout" in response.text
        labels = {"model": MODEL_ID, "endpoint": "/v1/completions", "status": "504"}
        assert sample(client, "sluice_requests_total", **labels) == 1
        assert sample(client, "sluice_rejections_total", reason="request_timeout") == 1


def test_exposition_has_engine_gauges_and_skips_probes(client: TestClient) -> None:
    client.get("/healthz")
    client.get("/readyz")
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "sluice_engine_running",
        "sluice_engine_waiting",
        "sluice_engine_kv_cache_usage",
        "sluice_in_flight_requests",
        "sluice_model_load_seconds",
    ):
        assert name in families, name
    running = families["sluice_engine_running"].samples[0]
    assert running.labels == {"model": MODEL_ID}
    assert running.value == 0
    assert "sluice_requests" not in families or not families["sluice_requests"].samples


def test_metrics_token_is_enforced(engine: FakeEngine) -> None:
    settings = make_settings(telemetry={"metrics_token": "s3cret"})
    with app_client(engine, settings) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        assert "sluice_engine_running" in allowed.text


def test_cost_follows_the_price_table(engine: FakeEngine) -> None:
    settings = make_settings(
        pricing={"models": {MODEL_ID: {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 10.0}}}
    )
    with app_client(engine, settings) as client:
        client.post("/v1/completions", json=completion_body(max_tokens=4))  # 3 in, 4 out
        cost = sample(client, "sluice_cost_usd_total", model=MODEL_ID)
    assert cost == pytest.approx((3 * 2.0 + 4 * 10.0) / 1_000_000)


def test_telemetry_off_records_no_requests_but_keeps_engine_gauges(engine: FakeEngine) -> None:
    with app_client(engine, make_settings(telemetry={"enabled": False})) as client:
        assert client.post("/v1/completions", json=completion_body()).status_code == 200
        text = client.get("/metrics").text
    assert (
        sample(
            client,
            "sluice_requests_total",
            model=MODEL_ID,
            endpoint="/v1/completions",
            status="200",
        )
        is None
    )
    assert "sluice_engine_running" in text
