"""Streaming: SSE framing, chat role deltas, include_usage, and OpenAI's chunk schemas."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, assert_settled, chat_body, completion_body
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_data, sse_json
from tests.fake_engine import MODEL_ID, FakeEngine


def stream(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    return sse_json(response.text)


def check_chat_chunk(chunk: dict[str, Any]) -> None:
    assert_matches(chunk, "CreateChatCompletionStreamResponse")


def test_completion_stream(client: TestClient, engine: FakeEngine) -> None:
    chunks = stream(client, "/v1/completions", completion_body(max_tokens=3))
    assert len(chunks) == 3
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("cmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["model"] == MODEL_ID for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": " w0_0", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": " w0_1", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": " w0_2", "logprobs": None, "finish_reason": "length"}],
    ]
    # OpenAI's CreateCompletionResponse doubles as the chunk schema but has no null
    # finish_reason, so only the final chunk can be checked against it.
    assert_matches(chunks[-1], "CreateCompletionResponse")
    assert_settled(client, engine)
    assert engine.aborted == []


def test_framing_is_exact(client: TestClient) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=2, stream=True))
    payloads = sse_data(response.text)
    assert len(payloads) == 3
    assert response.text.endswith("\n\ndata: [DONE]\n\n")
    assert response.text.count("data: ") == 3


def test_completion_stream_with_stop(client: TestClient) -> None:
    chunks = stream(client, "/v1/completions", completion_body(max_tokens=10, stop=["w0_1"]))
    assert "".join(c["choices"][0]["text"] for c in chunks) == " w0_0 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_stream_echo(client: TestClient) -> None:
    chunks = stream(client, "/v1/completions", completion_body(max_tokens=2, echo=True))
    assert [c["choices"][0]["text"] for c in chunks] == ["one two three w0_0", " w0_1"]


def test_completion_stream_many_choices(client: TestClient, engine: FakeEngine) -> None:
    chunks = stream(
        client, "/v1/completions", completion_body(prompt=["a", "b c"], n=2, max_tokens=2)
    )
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == {0: " w0_0 w0_1", 1: " w1_0 w1_1", 2: " w0_0 w0_1", 3: " w1_0 w1_1"}
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert_settled(client, engine)


def test_completion_stream_include_usage(client: TestClient) -> None:
    chunks = stream(
        client,
        "/v1/completions",
        completion_body(max_tokens=2, stream_options={"include_usage": True}),
    )
    assert len(chunks) == 3
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert last["id"] == chunks[0]["id"]
    assert_matches(last, "CreateCompletionResponse")


def test_chat_stream(client: TestClient, engine: FakeEngine) -> None:
    chunks = stream(client, "/v1/chat/completions", chat_body(max_tokens=3))
    assert len(chunks) == 3
    for chunk in chunks:
        check_chat_chunk(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"].startswith("chatcmpl-")
        assert "usage" not in chunk
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": " w0_0"},
        {"content": " w0_1"},
        {"content": " w0_2"},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert_settled(client, engine)


def test_chat_stream_each_choice_starts_with_role(client: TestClient) -> None:
    chunks = stream(client, "/v1/chat/completions", chat_body(n=2, max_tokens=2))
    first_delta: dict[int, dict[str, Any]] = {}
    later_deltas: list[dict[str, Any]] = []
    for chunk in chunks:
        check_chat_chunk(chunk)
        (choice,) = chunk["choices"]
        if choice["index"] in first_delta:
            later_deltas.append(choice["delta"])
        else:
            first_delta[choice["index"]] = choice["delta"]
    assert first_delta == {
        0: {"role": "assistant", "content": " w0_0"},
        1: {"role": "assistant", "content": " w1_0"},
    }
    assert all("role" not in delta for delta in later_deltas)


def test_chat_stream_include_usage(client: TestClient) -> None:
    chunks = stream(
        client,
        "/v1/chat/completions",
        chat_body(max_tokens=2, stream_options={"include_usage": True}),
    )
    assert len(chunks) == 3
    for chunk in chunks:
        check_chat_chunk(chunk)
    assert [c["usage"] for c in chunks[:-1]] == [None, None]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_chat_stream_include_usage_false(client: TestClient) -> None:
    chunks = stream(
        client,
        "/v1/chat/completions",
        chat_body(max_tokens=2, stream_options={"include_usage": False}),
    )
    assert len(chunks) == 2
    assert all("usage" not in c for c in chunks)


def test_chat_stream_logprobs(client: TestClient) -> None:
    chunks = stream(
        client, "/v1/chat/completions", chat_body(max_tokens=2, logprobs=True, top_logprobs=2)
    )
    for chunk in chunks:
        check_chat_chunk(chunk)
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks] == [
        " w0_0",
        " w0_1",
    ]


def test_invalid_streaming_request_is_a_plain_json_error(
    client: TestClient, engine: FakeEngine
) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(model="nope", stream=True))
    assert_error(response, 404, param="model", code="model_not_found")
    assert engine.requests == []
