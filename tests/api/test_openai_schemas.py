"""The carried OpenAI schemas: up to date, not vacuous, and sluice's raw bodies against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api import extract_openai_schemas
from tests.api.conftest import chat_body
from tests.api.openai_schema import SCHEMA_FILE, schema_errors
from tests.api.sse import sse_json

HERE = Path(__file__).parent
SOURCE = extract_openai_schemas.DEFAULT_SOURCE


@pytest.mark.skipif(not SOURCE.is_file(), reason="OpenAI's openapi.yaml is not beside the repo")
def test_carried_schemas_match_a_fresh_extraction() -> None:
    fresh = extract_openai_schemas.extract(extract_openai_schemas.load(SOURCE))
    assert json.loads(SCHEMA_FILE.read_text()) == fresh


@pytest.mark.skipif(not SOURCE.is_file(), reason="OpenAI's openapi.yaml is not beside the repo")
def test_licence_is_carried() -> None:
    assert (HERE / "OPENAI-OPENAPI-LICENSE").read_text() == (SOURCE.parent / "LICENSE").read_text()


def test_nullable_became_json_schema() -> None:
    assert "nullable" not in SCHEMA_FILE.read_text()


GOOD_COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def test_validation_is_not_vacuous() -> None:
    assert schema_errors(GOOD_COMPLETION, "CreateCompletionResponse") == []
    assert schema_errors({**GOOD_COMPLETION, "object": "completion"}, "CreateCompletionResponse")
    broken_choice = {**GOOD_COMPLETION, "choices": [{"index": 0, "text": "x"}]}
    assert schema_errors(broken_choice, "CreateCompletionResponse")
    bad_usage = {**GOOD_COMPLETION, "usage": {"prompt_tokens": "1"}}
    assert schema_errors(bad_usage, "CreateCompletionResponse")
    assert schema_errors({"error": {"message": "m", "type": "t"}}, "ErrorResponse")


def test_stream_chunk_nullables() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    }
    assert schema_errors(chunk, "CreateChatCompletionStreamResponse") == []
    chunk["usage"] = {"prompt_tokens": 1}
    assert schema_errors(chunk, "CreateChatCompletionStreamResponse")
    chunk["usage"] = None
    chunk["choices"][0]["finish_reason"] = "done"
    assert schema_errors(chunk, "CreateChatCompletionStreamResponse")


def test_raw_chat_response_matches(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=chat_body()).json()
    assert schema_errors(body, "CreateChatCompletionResponse") == []


def test_raw_chat_chunks_match(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(stream=True))
    for chunk in sse_json(response.text):
        assert schema_errors(chunk, "CreateChatCompletionStreamResponse") == []
