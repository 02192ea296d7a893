"""The per-request time limit: 504 request_timeout (or an in-stream error) and an abort."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from sluice.config import Settings
from sluice.lifecycle import Phase
from tests.api.conftest import (
    API_LIMITS,
    assert_error,
    completion_body,
    lifecycle_of,
    make_settings,
)
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_json
from tests.fake_engine import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(token_delay_s=0.05)


@pytest.fixture
def settings() -> Settings:
    return make_settings(limits={**API_LIMITS, "request_timeout_s": 0.2})


def test_non_streaming(client: TestClient, engine: FakeEngine) -> None:
    started = time.monotonic()
    response = client.post("/v1/completions", json=completion_body(max_tokens=50))
    elapsed = time.monotonic() - started
    error = assert_error(response, 504, type_="timeout_error", code="request_timeout")
    assert "0.2 seconds" in error["message"]
    assert "retry-after" not in response.headers
    assert elapsed < 1.5  # stopped at the limit, not after 50 tokens (2.5 s)
    (request,) = engine.requests
    assert engine.aborted == [request.request_id]
    assert lifecycle_of(client).phase is Phase.READY  # a slow request is not a dead engine


def test_streaming(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=50, stream=True))
    assert response.status_code == 200
    chunks = sse_json(response.text)
    *tokens, last = chunks
    assert 1 <= len(tokens) <= 4
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert_matches(last, "ErrorResponse")
    assert last["error"]["code"] == "request_timeout"
    assert last["error"]["type"] == "timeout_error"
    assert engine.aborted == [engine.requests[0].request_id]


def test_a_responses_stream_ends_in_its_own_error_event(
    client: TestClient, engine: FakeEngine
) -> None:
    # OpenAI's Responses stream: typed, numbered events; an error is an `error` event (its
    # ResponseErrorEvent), and the stream has no `[DONE]`
    body = {"model": "fake-model", "input": "hi", "max_output_tokens": 50, "stream": True}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200
    events = response.text.strip().split("\n\n")
    assert "[DONE]" not in response.text
    numbers = [json.loads(e.split("data: ", 1)[1])["sequence_number"] for e in events]
    assert numbers == list(range(len(events)))
    last = events[-1].split("\n")
    assert last[0] == "event: error"
    error = json.loads(last[1].removeprefix("data: "))
    assert error == {
        "type": "error",
        "code": "request_timeout",
        "message": error["message"],
        "param": None,
        "sequence_number": len(events) - 1,
    }
    assert engine.aborted == [engine.requests[0].request_id]


def test_every_engine_request_of_the_job_is_aborted(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions",
        json=completion_body(prompt=["a", "b"], n=2, temperature=0, max_tokens=50),
    )
    assert_error(response, 504, type_="timeout_error", code="request_timeout")
    assert len(engine.requests) == 4
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)


def test_request_within_the_limit(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=2))
    assert response.status_code == 200
    assert engine.aborted == []
