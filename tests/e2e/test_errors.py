"""Bad input against the real server: OpenAI-shaped errors mapped to the SDK's exception types,
and no engine work left behind."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess

CHAT = [{"role": "user", "content": "hi"}]


def _assert_error_shape(body: dict[str, Any]) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 5}, "n"),  # over the configured cap of 4
        ({"max_tokens": 1500}, "max_tokens"),  # over the configured cap of 1024
        ({"max_tokens": "many"}, "max_tokens"),  # wrong type
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_values_are_400_with_param(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_missing_field_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", body={"model": MODEL}, cast_to=httpx.Response)
    assert caught.value.param == "prompt"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert caught.value.code == "model_not_found"


def test_context_overflow_is_400_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="hello " * 1900, max_tokens=500)
    assert caught.value.code == "context_length_exceeded"
    assert "2048" in caught.value.message


def test_prompt_alone_over_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 2100}]
        )
    assert caught.value.code == "context_length_exceeded"


def test_malformed_json_is_400(server: SluiceProcess) -> None:
    response = httpx.post(
        f"{server.api}/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    _assert_error_shape(response.json())


def test_oversized_body_is_413(server: SluiceProcess) -> None:
    body = b'{"model": "m", "prompt": "' + b"x" * 70_000 + b'"}'
    response = httpx.post(
        f"{server.api}/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    _assert_error_shape(response.json())
    assert response.json()["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(server: SluiceProcess) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "m", "prompt": "'
        for _ in range(20):
            yield b"x" * 5000
        yield b'"}'

    response = httpx.post(
        f"{server.api}/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_errors_leave_no_engine_work_behind(client: openai.OpenAI, server: SluiceProcess) -> None:
    for kwargs in ({"temperature": 9}, {"model": "nope"}, {"max_tokens": 5000}):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(**{"model": MODEL, "messages": CHAT, **kwargs})
    stats = server.wait_idle()
    assert stats == {**stats, "running": 0, "waiting": 0, "in_flight": 0}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**64},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": 10**23}},
            }
        },
    ],
    ids=["top_k", "schema-maximum"],
)
def test_numbers_the_engine_cannot_carry_are_400_and_leave_nothing(
    server: SluiceProcess, extra: dict[str, Any], stream: bool
) -> None:
    # vLLM's wire format to its engine core encodes integers in 64 bits: anything wider,
    # wherever in the body, is the request's fault (a 400 before any stream starts)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream": stream, **extra}
    response = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    _assert_error_shape(response.json())
    assert "out of range" in response.json()["error"]["message"]
    stats = server.wait_idle()
    assert stats == {**stats, "running": 0, "waiting": 0, "in_flight": 0}
