"""POST /v1/chat/completions through vLLM's serving layer: shapes, the chat template, n,
stop sequences, structured output and tool calls, usage."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import app_client, assert_settled, chat_body, chat_prompt, make_settings
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_json
from tests.fake_engine import MODEL_ID, FakeEngine, ScriptedCore

MESSAGES = [{"role": "user", "content": "hello there"}]


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
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == " one two"
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(chat_prompt(engine, MESSAGES))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["total_tokens"] == prompt_tokens + 2
    assert_settled(client, engine)
    assert engine.core.aborted == []


def test_the_models_chat_template_is_applied(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    client.post("/v1/chat/completions", json=chat_body(messages=messages))
    sent = engine.core.requests[0].prompt_token_ids
    # vLLM renders `developer` as the template's `system` turn, and text parts as text
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert sent == chat_prompt(engine, expected)


def test_n_choices(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(n=3, max_tokens=1, temperature=0.7)
    ).json()
    assert_matches(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 3
    assert_settled(client, engine)


def test_greedy_n_choices_run_as_single_requests_and_are_equal(
    client: TestClient, engine: FakeEngine
) -> None:
    # vLLM refuses n > 1 with temperature 0; OpenAI answers it (equal choices).
    body = client.post(
        "/v1/chat/completions", json=chat_body(n=2, temperature=0, max_tokens=2)
    ).json()
    assert [c["message"]["content"] for c in body["choices"]] == [" one two", " one two"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 4
    assert len(engine.core.requests) == 2
    assert all(r.sampling_params.n == 1 for r in engine.core.requests)
    assert_settled(client, engine)


def test_greedy_n_choices_stream(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(n=2, temperature=0, max_tokens=2, stream=True),
    )
    texts = ["", ""]
    finished = [None, None]
    for chunk in sse_json(response.text):
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert texts == [" one two", " one two"]
    assert finished == ["length", "length"]
    assert_settled(client, engine)


def test_stop_sequence(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=10, stop=["zz", " four"])
    ).json()
    assert body["choices"][0]["message"]["content"] == " one two three"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_default_max_tokens_is_the_rest_of_the_context(
    client: TestClient, engine: FakeEngine
) -> None:
    body = chat_body()
    del body["max_tokens"]
    client.post("/v1/chat/completions", json=body)
    # the fake's context is 512; the server caps max_tokens at 64 (API_LIMITS)
    assert engine.core.requests[0].sampling_params.max_tokens == 64


def test_json_schema_output_is_passed_to_vllm(engine: FakeEngine) -> None:
    engine.core.script = lambda request: '{"city": "Paris"}'
    with app_client(engine, make_settings()) as client:
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }
        body = client.post(
            "/v1/chat/completions",
            json=chat_body(
                max_tokens=20,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "capital", "schema": schema},
                },
            ),
        ).json()
        assert json.loads(body["choices"][0]["message"]["content"]) == {"city": "Paris"}
        assert body["choices"][0]["finish_reason"] == "stop"
        constraint = engine.core.requests[0].sampling_params.structured_outputs
        assert (
            json.loads(constraint.json) == schema
            if isinstance(constraint.json, str)
            else (constraint.json == schema)
        )
        assert_settled(client, engine)


def test_vllm_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            min_tokens=2,
            logit_bias={"1000": 5},
            seed=7,
            chat_template_kwargs={"add_generation_prompt": True},
        ),
    )
    assert response.status_code == 200, response.text
    params = engine.core.requests[0].sampling_params
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert (params.min_tokens, params.seed) == (2, 7)
    assert params.logit_bias == {1000: 5.0}


def test_tool_choice_required_needs_a_tool_parser(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    response = client.post(
        "/v1/chat/completions", json=chat_body(tools=tools, tool_choice="required")
    )
    assert response.status_code == 400
    assert "tool-call-parser" in response.json()["error"]["message"]


def test_tools_with_a_parser(engine_with_tools: FakeEngine) -> None:
    engine_with_tools.core.script = lambda request: (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with app_client(engine_with_tools, make_settings()) as client:
        body = client.post(
            "/v1/chat/completions", json=chat_body(tools=tools, tool_choice="auto", max_tokens=40)
        ).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls", body
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert_matches(body, "CreateChatCompletionResponse")
        assert_settled(client, engine_with_tools)


def test_max_tokens_zero_is_refused_by_vllm(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=0))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_scripted_core_sees_one_request(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert isinstance(engine.core, ScriptedCore)
    assert len(engine.core.requests) == 1


def test_an_answer_that_cannot_be_serialised_still_closes_its_request(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body is built before the response owns the request: a body that fails to build
    closes the exchange there (the client fixture checks nothing stays in flight)."""
    chat_class = type(client.app.state.serving.chat)  # type: ignore[attr-defined]
    original = chat_class.create_chat_completion

    class Unserialisable:
        def model_dump_json(self, **options: Any) -> str:
            raise TypeError("unable to serialize")

    async def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        await original(self, *args, **kwargs)
        return Unserialisable()

    monkeypatch.setattr(chat_class, "create_chat_completion", broken)
    response = client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code >= 400  # an error in OpenAI's shape, whichever status
    assert "unable to serialize" in response.json()["error"]["message"]
    assert_settled(client, engine)
