"""POST /v1/chat/completions, non-streaming: shapes, roles, structured output, usage."""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from tests.api.conftest import assert_settled, chat_body
from tests.api.openai_schema import assert_matches
from tests.fake_engine import MODEL_ID, FakeEngine


def test_shape(client: TestClient, engine: FakeEngine) -> None:
    before = int(time.time())
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert response.status_code == 200
    body = response.json()
    assert_matches(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert before <= body["created"] <= int(time.time())
    assert body["model"] == MODEL_ID
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " w0_0 w0_1", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    # rendered by the fake as "<user> hello there <assistant>": 4 tokens
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert_settled(client, engine)
    assert engine.aborted == []


def test_chat_template_is_applied(client: TestClient, engine: FakeEngine) -> None:
    client.post(
        "/v1/chat/completions",
        json=chat_body(
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ]
        ),
    )
    # "<system> be brief <user> hi <assistant>" as the fake's word-length token ids
    assert engine.requests[0].prompt_token_ids == (8, 2, 5, 6, 2, 11)


def test_n_choices(client: TestClient, engine: FakeEngine) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(n=3, max_tokens=1)).json()
    assert_matches(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [" w0_0", " w1_0", " w2_0"]
    assert body["usage"]["completion_tokens"] == 3
    assert len(engine.requests) == 1


def test_greedy_n_choices_are_equal(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(n=2, temperature=0, max_tokens=1)
    ).json()
    assert [c["message"]["content"] for c in body["choices"]] == [" w0_0", " w0_0"]
    assert len(engine.requests) == 2
    assert_settled(client, engine)


def test_stop_sequence(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=10, stop=["zz", "w0_1"])
    ).json()
    assert body["choices"][0]["message"]["content"] == " w0_0 "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_1_is_length(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=1)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


def test_default_max_tokens_is_the_cap_or_the_room_left(client: TestClient) -> None:
    body = chat_body()
    del body["max_tokens"]
    assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 64
    body["messages"] = [{"role": "user", "content": " ".join(["w"] * 250)}]
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage == {"prompt_tokens": 252, "completion_tokens": 4, "total_tokens": 256}


def test_max_completion_tokens_wins(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=5, max_completion_tokens=2)
    ).json()
    assert body["usage"]["completion_tokens"] == 2


def test_json_object_response_format(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})
    ).json()
    content = body["choices"][0]["message"]["content"]
    assert json.loads(content) == {"city": "Paris"}
    assert body["choices"][0]["finish_reason"] == "stop"
    structured = engine.requests[0].sampling.structured
    assert structured is not None
    assert structured.json_schema is None


def test_json_schema_response_format(client: TestClient, engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "place", "schema": schema, "strict": True},
            }
        ),
    )
    assert response.status_code == 200
    structured = engine.requests[0].sampling.structured
    assert structured is not None
    assert structured.json_schema == schema


def test_logprobs(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=1, logprobs=True, top_logprobs=1)
    ).json()
    assert_matches(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": " w0_0",
                "logprob": -0.5,
                "bytes": list(b" w0_0"),
                "top_logprobs": [{"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")}],
            }
        ],
        "refusal": None,
    }


def test_assistant_history_and_null_content(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "again", "name": "bob"},
            ]
        ),
    )
    assert response.status_code == 200
