"""Streams: OpenAI's SSE framing and chunk shapes, the usage chunk, rate-limit headers before
the first byte, keep-alive comments, and errors inside a stream."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.api.conftest import (
    app_client,
    assert_settled,
    chat_body,
    completion_body,
    lifecycle_of,
    make_settings,
)
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_json
from tests.fake_engine import FakeEngine, ScriptedCore


def test_chat_stream_framing_and_chunks(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(stream=True, max_tokens=3, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    chunks = sse_json(response.text)
    for chunk in chunks:
        assert_matches(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == " one two three"
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length"
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1
    assert_settled(client, engine)


def test_completion_stream(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(stream=True, max_tokens=2))
    chunks = sse_json(response.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " one two"
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert_settled(client, engine)


def test_no_usage_chunk_unless_asked(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=2))
    chunks = sse_json(response.text)
    assert all(c["choices"] for c in chunks)


def test_continuous_usage_stats(client: TestClient) -> None:
    # vLLM's stream_options field: usage on every chunk
    response = client.post(
        "/v1/completions",
        json=completion_body(
            stream=True,
            max_tokens=2,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        ),
    )
    chunks = sse_json(response.text)
    assert all(c.get("usage") for c in chunks)


def test_ping_comments_while_a_stream_waits(engine_slow_keep_alive: FakeEngine) -> None:
    with app_client(engine_slow_keep_alive, make_settings()) as client:
        response = client.post("/v1/completions", json=completion_body(stream=True, max_tokens=2))
        assert response.text.startswith(": ping\n\n")  # before the first token, too
        data = response.text.replace(": ping\n\n", "")
        assert [json.loads(c)["choices"][0]["text"] for c in data.split("data: ")[1:-1]] == [
            " one",
            " two",
        ]
        assert_settled(client, engine_slow_keep_alive)


def test_engine_death_mid_stream_is_an_error_event_then_done(engine: FakeEngine) -> None:
    engine.core.fail_after_tokens = 2
    with app_client(engine, make_settings()) as client:
        response = client.post("/v1/completions", json=completion_body(stream=True, max_tokens=10))
        assert response.status_code == 200
        chunks = sse_json(response.text)
        error = chunks[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_dead"
        assert error["type"] == "server_error"
        assert lifecycle_of(client).in_flight == 0
        assert client.get("/healthz").status_code == 503


def test_scripted_core_is_used(client: TestClient, engine: FakeEngine) -> None:
    assert isinstance(engine.core, ScriptedCore)
