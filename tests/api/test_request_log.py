"""One JSON log line per request, with what an operator needs and never the prompt."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from sluice.telemetry.logging import REQUEST_LOGGER, JsonFormatter
from tests.api.conftest import app_client, chat_body, completion_body, make_settings
from tests.fake_engine import MODEL_ID, FakeEngine


def request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == REQUEST_LOGGER]


def test_one_line_per_request_with_its_facts(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    response = client.post(
        "/v1/completions",
        json=completion_body(prompt="secret prompt words", max_tokens=2),
        headers={"x-request-id": "req-42"},
    )
    assert response.status_code == 200
    (line,) = request_lines(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert fields["logger"] == REQUEST_LOGGER
    assert fields["request_id"] == "req-42"
    assert fields["model"] == MODEL_ID
    assert fields["status"] == 200
    assert fields["reason"] is None
    assert fields["prompt_tokens"] == 3
    assert fields["completion_tokens"] == 2
    assert fields["ttft_ms"] >= 0
    assert fields["latency_ms"] >= fields["ttft_ms"]
    assert "secret" not in json.dumps(fields)


def test_refusal_line_carries_the_reason(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    client.post("/v1/completions", json=completion_body(model="nope"))
    (line,) = request_lines(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert (fields["status"], fields["reason"]) == (404, "model_not_found")
    assert fields["ttft_ms"] is None


def test_probes_write_no_request_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    client.get("/healthz")
    client.get("/readyz")
    client.get("/metrics")
    assert request_lines(caplog) == []


def test_prompt_logging_is_opt_in_and_redacted(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    settings = make_settings(telemetry={"log_prompts": True})
    with app_client(engine, settings) as client:
        client.post(
            "/v1/chat/completions",
            json=chat_body(
                messages=[{"role": "user", "content": "I am bob@example.com, call +1 415 555 0100"}]
            ),
        )
    (line,) = request_lines(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert fields["prompt"] == "user: I am [EMAIL], call [PHONE]"
    assert fields["output"] == " one two three"
    assert "bob@example.com" not in json.dumps(fields)


def test_prompts_are_absent_by_default(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    client.post("/v1/chat/completions", json=chat_body())
    (line,) = request_lines(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert "prompt" not in fields
    assert "output" not in fields


def test_the_line_carries_the_requests_cost(caplog: pytest.LogCaptureFixture) -> None:
    pricing = {"default": {"input_usd_per_mtok": 1000, "output_usd_per_mtok": 3000}}
    with app_client(FakeEngine(), make_settings(pricing=pricing)) as client:
        caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
        assert client.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200
    (line,) = request_lines(caplog)
    fields = json.loads(JsonFormatter().format(line))
    # 3 prompt tokens at $1000/M and 2 output tokens at $3000/M
    assert fields["cost_usd"] == pytest.approx(3 * 0.001 + 2 * 0.003)
