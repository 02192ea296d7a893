"""Rejected requests: OpenAI's error shape, the right status/param/code, and no engine work."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, chat_body, completion_body
from tests.fake_engine import FakeEngine

LONG_PROMPT = " ".join(["w"] * 250)  # 250 of the fake's 256 tokens


def post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, json=body)


@pytest.fixture(autouse=True)
def _no_engine_work(engine: FakeEngine) -> Any:
    """Every request in this module is refused before generation."""
    yield
    assert engine.requests == []
    assert engine.aborted == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400_not_422(client: TestClient, path: str) -> None:
    response = client.post(
        path, content=b'{"model": "fake-model", ', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert error["message"].startswith("We could not parse the JSON body of your request.")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/completions", {"model": "fake-model"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/chat/completions", {"model": "fake-model"}, "messages"),
        ("/v1/chat/completions", chat_body(messages=[{"content": "hi"}]), "messages.0.role"),
    ],
)
def test_missing_field(client: TestClient, path: str, body: Any, param: str) -> None:
    error = assert_error(post(client, path, body), 400, param=param)
    assert error["message"] == f"Missing required parameter: '{param}'."


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (completion_body(max_tokens="5"), "max_tokens"),
        (completion_body(max_tokens=5.0), "max_tokens"),
        (completion_body(max_tokens=True), "max_tokens"),
        (completion_body(max_tokens=0), "max_tokens"),
        (completion_body(temperature=3), "temperature"),
        (completion_body(temperature=-0.1), "temperature"),
        (completion_body(temperature="hot"), "temperature"),
        (completion_body(top_p=0), "top_p"),
        (completion_body(top_p=1.5), "top_p"),
        (completion_body(n=0), "n"),
        (completion_body(n=200), "n"),
        (completion_body(presence_penalty=3), "presence_penalty"),
        (completion_body(frequency_penalty=-3), "frequency_penalty"),
        (completion_body(model=""), "model"),
        (completion_body(model=5), "model"),
        (completion_body(prompt=5), "prompt"),
        (completion_body(prompt=[]), "prompt"),
        (completion_body(prompt=[1, 2, 3]), "prompt"),
        (completion_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (completion_body(stop=[""]), "stop"),
        (completion_body(logprobs=6), "logprobs"),
        (completion_body(stream="yes"), "stream"),
        (
            completion_body(stream=True, stream_options={"include_usage": "y"}),
            "stream_options.include_usage",
        ),
    ],
)
def test_invalid_completion_field(client: TestClient, body: Any, param: str) -> None:
    assert_error(post(client, "/v1/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(messages=[]), "messages"),
        (chat_body(messages="hi"), "messages"),
        (chat_body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (chat_body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (
            chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages.0.content",
        ),
        (chat_body(max_completion_tokens=0), "max_completion_tokens"),
        (chat_body(top_logprobs=21, logprobs=True), "top_logprobs"),
        (chat_body(logprobs=1), "logprobs"),
        (chat_body(response_format={"type": "xml"}), "response_format.type"),
        (chat_body(response_format={"type": "json_schema"}), "response_format"),
    ],
)
def test_invalid_chat_field(client: TestClient, body: Any, param: str) -> None:
    assert_error(post(client, "/v1/chat/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (chat_body(functions=[{"name": "f"}]), "functions"),
        (chat_body(top_logprobs=2), "top_logprobs"),  # without logprobs
    ],
    ids=["tools", "functions", "top_logprobs-alone"],
)
def test_unsupported_combinations(client: TestClient, body: Any, param: str) -> None:
    assert_error(post(client, "/v1/chat/completions", body), 400, param=param)


def test_tools_message_says_unsupported(client: TestClient) -> None:
    response = post(client, "/v1/chat/completions", chat_body(tools=[{"type": "function"}]))
    assert "tool and function calling are not supported" in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [[1, 2], "text", 5], ids=["array", "string", "number"])
def test_body_that_is_not_an_object(client: TestClient, body: Any) -> None:
    error = assert_error(post(client, "/v1/completions", body), 400)
    assert error["message"] == (
        "The request body must be a JSON object sent with 'Content-Type: application/json'."
    )


@pytest.mark.parametrize("content", [b"", b"null"], ids=["empty", "null"])
def test_missing_body_is_400(client: TestClient, content: bytes) -> None:
    response = client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert "'None'" not in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model(client: TestClient, path: str) -> None:
    body = completion_body(model="gpt-4") if "chat" not in path else chat_body(model="gpt-4")
    error = assert_error(post(client, path, body), 404, param="model", code="model_not_found")
    assert "'gpt-4'" in error["message"]
    assert "'fake-model'" in error["message"]


def test_completion_context_overflow(client: TestClient) -> None:
    error = assert_error(
        post(client, "/v1/completions", completion_body(prompt=LONG_PROMPT, max_tokens=10)),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    assert "maximum context length is 256 tokens" in error["message"]
    assert "requested 260 tokens" in error["message"]


def test_completion_prompt_fills_context(client: TestClient) -> None:
    body = completion_body(prompt=" ".join(["w"] * 256))
    del body["max_tokens"]
    assert_error(
        post(client, "/v1/completions", body), 400, param="prompt", code="context_length_exceeded"
    )


def test_one_prompt_of_a_list_overflows(client: TestClient) -> None:
    body = completion_body(prompt=["short", LONG_PROMPT], max_tokens=10)
    assert_error(
        post(client, "/v1/completions", body), 400, param="prompt", code="context_length_exceeded"
    )


def test_chat_context_overflow(client: TestClient) -> None:
    body = chat_body(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=10)
    assert_error(
        post(client, "/v1/chat/completions", body),
        400,
        param="messages",
        code="context_length_exceeded",
    )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_over_cap(client: TestClient, path: str) -> None:
    body = completion_body(n=5) if "chat" not in path else chat_body(n=5)
    error = assert_error(post(client, path, body), 400, param="n")
    assert "n=5" in error["message"]


def test_too_many_prompts(client: TestClient) -> None:
    body = completion_body(prompt=["a"] * 17)
    assert_error(post(client, "/v1/completions", body), 400, param="prompt")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/completions", "max_tokens"),
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
    ],
)
def test_max_tokens_over_cap(client: TestClient, path: str, field: str) -> None:
    body = completion_body() if "chat" not in path else chat_body()
    body[field] = 65
    error = assert_error(post(client, path, body), 400, param=field)
    assert "(64)" in error["message"]


def test_streaming_requests_are_refused_the_same_way(client: TestClient) -> None:
    body = completion_body(max_tokens=65, stream=True)
    assert_error(post(client, "/v1/completions", body), 400, param="max_tokens")


def test_unknown_url(client: TestClient) -> None:
    error = assert_error(client.get("/v1/nothing-here"), 404, code="http_404")
    assert error["message"] == "Unknown URL. Check the path of your request."
    assert_error(client.post("/v1/embeddings", json={}), 404, code="http_404")


def test_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/completions"), 405, code="http_405")


def test_unknown_model_id_on_models_route(client: TestClient) -> None:
    assert_error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")
