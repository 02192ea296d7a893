"""The one error table: statuses, OpenAI types and codes, bodies, Retry-After, 400 params."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from sluice import errors
from sluice.api.requests import ChatCompletionRequest, CompletionRequest
from sluice.errors import (
    ERROR_TABLE,
    Conflict,
    ContextLengthExceeded,
    Draining,
    EngineDead,
    InternalError,
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    PermissionDenied,
    QuotaExceeded,
    RateLimitExceeded,
    RequestTimedOut,
    ServiceUnavailable,
    SluiceError,
    StoreUnavailable,
    Unauthenticated,
    UpstreamError,
    as_sluice_error,
    error_body,
    error_response,
    from_exception,
    from_vllm,
    spec_for,
    validation_error,
)

EXPECTED = [
    (InvalidRequest, 400, "invalid_request_error", None),
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (NotSupported, 400, "invalid_request_error", "not_supported"),
    (Unauthenticated, 401, "invalid_request_error", "invalid_api_key"),
    (PermissionDenied, 403, "invalid_request_error", "model_not_allowed"),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (Conflict, 409, "invalid_request_error", "conflict"),
    (PayloadTooLarge, 413, "invalid_request_error", "request_too_large"),
    (RateLimitExceeded, 429, "requests", "rate_limit_exceeded"),
    (QuotaExceeded, 429, "insufficient_quota", "insufficient_quota"),
    (ServiceUnavailable, 503, "server_error", "overloaded"),
    (StoreUnavailable, 503, "server_error", "store_unavailable"),
    (ModelLoading, 503, "server_error", "model_loading"),
    (Draining, 503, "server_error", "draining"),
    (EngineDead, 503, "server_error", "engine_dead"),
    (RequestTimedOut, 504, "timeout_error", "request_timeout"),
    (UpstreamError, 502, "server_error", "upstream_error"),
    (InternalError, 500, "server_error", None),
]


@pytest.mark.parametrize(("cls", "status", "type_", "code"), EXPECTED)
def test_table_row(cls: type[SluiceError], status: int, type_: str, code: str | None) -> None:
    spec = spec_for(cls("boom"))
    assert (spec.status, spec.type, spec.code) == (status, type_, code)


def test_table_covers_every_error_class() -> None:
    assert set(ERROR_TABLE) == {cls for cls, *_ in EXPECTED}


def test_an_upstream_error_keeps_the_upstream_status_it_carries() -> None:
    refused = UpstreamError("bad field", status=400, error_type="invalid_request_error")
    response = error_response(refused)
    assert response.status_code == 400
    assert json.loads(bytes(response.body))["error"]["type"] == "invalid_request_error"
    assert error_response(UpstreamError("timed out", status=504)).status_code == 504


def test_subclass_without_row_uses_its_parents_row() -> None:
    class QueueFull(ServiceUnavailable):
        pass

    assert spec_for(QueueFull("busy")).status == 503
    assert spec_for(QueueFull("busy")).code == "overloaded"


def test_bare_base_class_is_a_500() -> None:
    assert spec_for(SluiceError("?")).status == 500


@pytest.mark.parametrize(("cls", "status", "type_", "code"), EXPECTED)
def test_error_body_has_all_four_keys(
    cls: type[SluiceError], status: int, type_: str, code: str | None
) -> None:
    body = error_body(cls("Something went wrong.", param="x"))
    assert body == {
        "error": {"message": "Something went wrong.", "type": type_, "param": "x", "code": code}
    }


def test_error_body_keeps_null_keys() -> None:
    assert error_body(InvalidRequest("Bad.")) == {
        "error": {"message": "Bad.", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_explicit_code_wins_over_table_code() -> None:
    assert error_body(ServiceUnavailable("Busy.", code="queue_full"))["error"]["code"] == (
        "queue_full"
    )


def test_error_response_status_and_json() -> None:
    response = error_response(ModelNotFound("No such model.", param="model"))
    assert response.status_code == 404
    assert json.loads(bytes(response.body)) == {
        "error": {
            "message": "No such model.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert "retry-after" not in response.headers


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (2.5, "3"), (10.0, "10"), (59.9, "60")],
)
def test_retry_after_rounds_up_to_at_least_one(seconds: float, header: str) -> None:
    response = error_response(ServiceUnavailable("Busy.", retry_after_s=seconds))
    assert response.headers["retry-after"] == header


def test_as_sluice_error_hides_internals(caplog: pytest.LogCaptureFixture) -> None:
    mapped = as_sluice_error(RuntimeError("secret path /etc/passwd"))
    assert isinstance(mapped, InternalError)
    assert "secret" not in mapped.message
    assert "secret path" in caplog.text  # logged for the operator


def test_as_sluice_error_passes_sluice_errors_through() -> None:
    original = Draining("Bye.")
    assert as_sluice_error(original) is original


# --- validation_error: pydantic's first complaint -> one 400 naming the field -------------


def fastapi_error(model: type[Any], body: Any) -> RequestValidationError:
    """The RequestValidationError FastAPI raises for `body` (locations prefixed by 'body')."""
    try:
        TypeAdapter(model).validate_python(body)
    except ValidationError as exc:
        return RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        )
    raise AssertionError(f"{body!r} unexpectedly validated")


COMPLETION = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (CompletionRequest, {**COMPLETION, "max_tokens": "five"}, "max_tokens"),
        (CompletionRequest, {**COMPLETION, "temperature": "hot"}, "temperature"),
        (CompletionRequest, {**COMPLETION, "prompt": 5}, "prompt"),  # union member dropped
        (CompletionRequest, {**COMPLETION, "stop": [1, 2]}, "stop"),
        (CompletionRequest, {**COMPLETION, "seed": 2**64}, "seed"),
        (
            CompletionRequest,
            {**COMPLETION, "stream": True, "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
        ),
        (
            ChatCompletionRequest,
            {**CHAT, "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        (ChatCompletionRequest, {**CHAT, "logprobs": "maybe"}, "logprobs"),
    ],
)
def test_validation_error_names_the_field(model: type[Any], body: Any, param: str) -> None:
    exc = validation_error(fastapi_error(model, body))
    assert isinstance(exc, InvalidRequest)
    assert exc.param == param
    assert exc.message.startswith(f"Invalid value for '{param}': ")
    assert exc.message.endswith(".")


def test_missing_field() -> None:
    exc = validation_error(fastapi_error(ChatCompletionRequest, {"model": "m"}))
    assert exc.param == "messages"
    assert exc.message == "Missing required parameter: 'messages'."


def test_body_not_an_object() -> None:
    # what FastAPI reports for a JSON array or string where the body model is expected
    raw = RequestValidationError(
        [
            {
                "type": "model_attributes_type",
                "loc": ("body",),
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": [1, 2],
            }
        ]
    )
    exc = validation_error(raw)
    assert exc.param is None
    assert exc.message == (
        "The request body must be a JSON object sent with 'Content-Type: application/json'."
    )


def test_invalid_json() -> None:
    raw = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error", "input": {}}]
    )
    exc = validation_error(raw)
    assert exc.param is None
    assert exc.message.startswith("We could not parse the JSON body of your request.")


def test_no_errors_at_all() -> None:
    exc = validation_error(RequestValidationError([]))
    assert (exc.message, exc.param) == ("The request body is invalid.", None)


def test_missing_body_message_does_not_say_none() -> None:
    raw = RequestValidationError(
        [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    )
    exc = validation_error(raw)
    assert exc.param is None
    assert "None" not in exc.message


def test_module_exports_the_classes_it_documents() -> None:
    for cls, *_ in EXPECTED:
        assert cls.__name__ in (errors.__doc__ or "")


def test_an_instance_may_name_its_type_and_add_headers() -> None:
    exc = RateLimitExceeded(
        "slow down",
        retry_after_s=1.2,
        headers={"x-ratelimit-limit-tokens": "10"},
        error_type="tokens",
    )
    response = error_response(exc)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-ratelimit-limit-tokens"] == "10"
    assert json.loads(response.body)["error"]["type"] == "tokens"


# --- vLLM's errors -> the table ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "param", "cls"),
    [
        (400, "bad", "temperature", InvalidRequest),
        (422, "bad", None, InvalidRequest),
        (
            400,
            "This model's maximum context length is 8192 tokens. However, you requested 9000",
            None,
            ContextLengthExceeded,
        ),
        (
            400,
            "The decoder prompt (length 9000) is longer than the maximum model length",
            None,
            ContextLengthExceeded,
        ),
        (404, "The model `x` does not exist.", "model", ModelNotFound),
        (404, "The lora adapter 'a' cannot be found.", None, NotFound),
        (501, "The model does not support Chat Completions API", None, NotSupported),
        (503, "queue full", None, ServiceUnavailable),
        (500, "secret internals", None, InternalError),
    ],
)
def test_from_vllm(status: int, message: str, param: str | None, cls: type[SluiceError]) -> None:
    error = from_vllm(status, message, param)
    assert type(error) is cls
    if cls is InternalError:
        assert "secret" not in error.message
    else:
        assert error.message == message


def test_from_exception_classifies_as_vllms_server_does() -> None:
    from vllm.exceptions import VLLMValidationError

    error = from_exception(VLLMValidationError("n must be 1", parameter="n"))
    assert (type(error), error.param) == (InvalidRequest, "n")
    assert type(from_exception(ValueError("bad value"))) is InvalidRequest
    assert type(from_exception(NotImplementedError("no"))) is NotSupported
    assert type(from_exception(KeyError("internal"))) is InternalError


def test_from_exception_engine_dead_and_sluice_errors() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    assert type(from_exception(EngineDeadError())) is EngineDead
    original = Draining("Bye.")
    assert from_exception(original) is original


def test_error_response_renders_input_that_is_not_unicode() -> None:
    response = error_response(InvalidRequest("model '\ud800' is odd"))
    assert json.loads(response.body)["error"]["message"] == "model '\ud800' is odd"
