"""An engine that dies mid-generation: 503 engine_dead (or an in-stream error), dead probes,
exit code 1, and every request counted out."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sluice.lifecycle import Phase
from tests.api.conftest import assert_error, chat_body, completion_body, lifecycle_of
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_json
from tests.fake_engine import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(fail_after_tokens=2)


def assert_dead(client: TestClient, engine: FakeEngine) -> None:
    lifecycle = lifecycle_of(client)
    assert lifecycle.phase is Phase.DEAD
    assert lifecycle.exit_code == 1
    assert lifecycle.exit_requested.is_set()
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "dead"
    assert health.json()["reason"].startswith("engine died: ")
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "dead"
    # and nothing new reaches the engine
    before = len(engine.requests)
    again = client.post("/v1/completions", json=completion_body())
    assert_error(again, 503, type_="server_error", code="engine_dead")
    assert again.headers["retry-after"] == "10"
    assert len(engine.requests) == before


def test_non_streaming(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=5))
    error = assert_error(response, 503, type_="server_error", code="engine_dead")
    assert "EngineCore" not in error["message"]  # internals stay in the logs
    assert response.headers["retry-after"] == "10"
    assert_dead(client, engine)


def test_streaming(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    assert response.status_code == 200
    chunks = sse_json(response.text)  # also checks that data: [DONE] still ends the stream
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert " one two".startswith(text)  # what came before the death, then the error
    assert_matches(chunks[-1], "ErrorResponse")
    assert chunks[-1]["error"]["code"] == "engine_dead"
    assert chunks[-1]["error"]["type"] == "server_error"
    assert_dead(client, engine)


def test_several_engine_requests(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions", json=completion_body(prompt=["a", "b", "c"], max_tokens=5)
    )
    assert_error(response, 503, type_="server_error", code="engine_dead")
    assert len(engine.requests) == 3
    assert_dead(client, engine)


def test_short_request_before_failure_succeeds(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200
    assert lifecycle_of(client).phase is Phase.READY
