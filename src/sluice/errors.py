"""Typed errors and the one table that turns them into OpenAI-shaped HTTP responses.

Code anywhere in sluice raises a `SluiceError` subclass; only this module knows statuses.

    SluiceError
    ├── InvalidRequest            400 invalid_request_error (with `param`)
    │   ├── ContextLengthExceeded 400 code=context_length_exceeded
    │   └── NotSupported          400 code=not_supported (the loaded model cannot do this)
    ├── Unauthenticated           401 code=invalid_api_key
    ├── PermissionDenied          403 code=model_not_allowed | key_disabled | admin_only
    ├── ModelNotFound             404 code=model_not_found
    ├── NotFound                  404 code=not_found (admin API: unknown key)
    ├── Conflict                  409 code=conflict (admin API: name taken, file-managed key)
    ├── PayloadTooLarge           413 code=request_too_large
    ├── RateLimitExceeded         429 code=rate_limit_exceeded (+Retry-After, x-ratelimit-*)
    ├── QuotaExceeded             429 code=insufficient_quota (+Retry-After)
    ├── ServiceUnavailable        503 code=overloaded (+Retry-After)
    │   ├── ModelLoading          503 code=model_loading
    │   ├── Draining              503 code=draining
    │   ├── EngineDead            503 code=engine_dead
    │   └── StoreUnavailable      503 code=store_unavailable
    ├── RequestTimedOut           504 code=request_timeout
    ├── UpstreamError             502 code=upstream_error (or the upstream's own status:
    │                             400 for the request's fault, 504 upstream_timeout)
    └── InternalError             500 server_error

Every body is `{"error": {"message", "type", "param", "code"}}` with all four keys.

vLLM's serving layer reports errors its own way (an `ErrorResponse` whose `code` is the HTTP
status as an integer, or an exception); `from_vllm` and `from_exception` turn those into the
classes above, so clients see one shape whichever layer refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sluice.telemetry.record import record_of

logger = logging.getLogger(__name__)

UNION_MEMBER = re.compile(r"[A-Z\[\]-]")
# vLLM's validation errors end with "(parameter=NAME, value=...)", or (SamplingParams' own
# checks) start with the field's name: "presence_penalty must be in [-2, 2], got 3.0."
VLLM_PARAMETER = re.compile(r"\(parameter=([A-Za-z_][\w.]*)|^([a-z_][a-z0-9_]*) must ")


class SluiceError(Exception):
    """Base of every error sluice reports to a client."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.error_type = error_type  # overrides the table's type (429: "requests" | "tokens")


class InvalidRequest(SluiceError):
    """The client's request is malformed or asks for something out of range."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion does not fit the model's context."""


class NotSupported(InvalidRequest):
    """The endpoint or feature exists, but not for the loaded model (chat on an embedding
    model, embeddings on a generative one)."""


class Unauthenticated(SluiceError):
    """The request carries no valid credential for what it asks."""


class PermissionDenied(SluiceError):
    """The key is valid but may not do this (model not allowed, key disabled)."""


class RateLimitExceeded(SluiceError):
    """The key's requests or tokens per minute are used up for now."""


class QuotaExceeded(SluiceError):
    """The key's token or USD budget cannot cover this request in the current window."""


class ModelNotFound(SluiceError):
    """The request names a model this server does not serve."""


class NotFound(SluiceError):
    """The named thing (an API key, for the admin API) does not exist."""


class Conflict(SluiceError):
    """The request conflicts with what exists (a key name already in use)."""


class PayloadTooLarge(SluiceError):
    """The request body is larger than the configured limit."""


class ServiceUnavailable(SluiceError):
    """The server cannot take this request now; the client may retry later."""


class ModelLoading(ServiceUnavailable):
    """The engine is still loading the model."""


class Draining(ServiceUnavailable):
    """The server is shutting down and takes no new work."""


class EngineDead(ServiceUnavailable):
    """The inference engine has failed; the process is about to exit."""


class StoreUnavailable(ServiceUnavailable):
    """The shared limits store (Redis) is unreachable and the server fails closed."""


class RequestTimedOut(SluiceError):
    """The request ran past the configured per-request time limit."""


def request_timed_out(timeout_s: float) -> RequestTimedOut:
    """The error of a request that ran past the server's time limit (`timeout_s`)."""
    return RequestTimedOut(
        f"The request ran past this server's time limit of {timeout_s:g} seconds and was stopped."
    )


class UpstreamError(SluiceError):
    """An upstream backend failed or refused (backends/proxy.py): a 502 unless `status`
    carries the upstream's own (a 400 for the request's fault, 504 for its timeout)."""

    def __init__(self, message: str, *, status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status


class InternalError(SluiceError):
    """Anything unexpected; the message never carries internals."""


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str | None


ERROR_TABLE: dict[type[SluiceError], ErrorSpec] = {
    ContextLengthExceeded: ErrorSpec(400, "invalid_request_error", "context_length_exceeded"),
    NotSupported: ErrorSpec(400, "invalid_request_error", "not_supported"),
    InvalidRequest: ErrorSpec(400, "invalid_request_error", None),
    Unauthenticated: ErrorSpec(401, "invalid_request_error", "invalid_api_key"),
    PermissionDenied: ErrorSpec(403, "invalid_request_error", "model_not_allowed"),
    RateLimitExceeded: ErrorSpec(429, "requests", "rate_limit_exceeded"),
    QuotaExceeded: ErrorSpec(429, "insufficient_quota", "insufficient_quota"),
    ModelNotFound: ErrorSpec(404, "invalid_request_error", "model_not_found"),
    NotFound: ErrorSpec(404, "invalid_request_error", "not_found"),
    Conflict: ErrorSpec(409, "invalid_request_error", "conflict"),
    PayloadTooLarge: ErrorSpec(413, "invalid_request_error", "request_too_large"),
    ModelLoading: ErrorSpec(503, "server_error", "model_loading"),
    Draining: ErrorSpec(503, "server_error", "draining"),
    EngineDead: ErrorSpec(503, "server_error", "engine_dead"),
    StoreUnavailable: ErrorSpec(503, "server_error", "store_unavailable"),
    ServiceUnavailable: ErrorSpec(503, "server_error", "overloaded"),
    RequestTimedOut: ErrorSpec(504, "timeout_error", "request_timeout"),
    UpstreamError: ErrorSpec(502, "server_error", "upstream_error"),
    InternalError: ErrorSpec(500, "server_error", None),
}


def spec_for(exc: SluiceError) -> ErrorSpec:
    """The table row for `exc`, most specific class first (an upstream's own status wins)."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            spec = ERROR_TABLE[cls]
            status = getattr(exc, "status", None)
            return spec if status is None else dataclasses.replace(spec, status=status)
    return ERROR_TABLE[InternalError]


def error_code(exc: SluiceError) -> str:
    """A short, bounded reason for metrics and logs: the error's code, else its type."""
    spec = spec_for(exc)
    return exc.code or spec.code or spec.type


def error_body(exc: SluiceError) -> dict[str, Any]:
    """OpenAI's error object for `exc` (also used inside SSE streams)."""
    spec = spec_for(exc)
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type or spec.type,
            "param": exc.param,
            "code": exc.code if exc.code is not None else spec.code,
        }
    }


class ErrorJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may quote the client's
    input, and input that is not valid Unicode (a lone surrogate) must still render."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(exc: SluiceError) -> JSONResponse:
    """The HTTP response for `exc`, with `Retry-After` where the client should retry."""
    spec = spec_for(exc)
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return ErrorJSONResponse(error_body(exc), status_code=spec.status, headers=headers)


def as_sluice_error(exc: BaseException) -> SluiceError:
    """Map any exception to one safe to show a client (internals are logged, not sent)."""
    if isinstance(exc, SluiceError):
        return exc
    logger.error("unexpected error", exc_info=exc)
    return InternalError("The server had an error while processing your request.")


# The names this request's client used for fields vLLM reports under its own (chat's
# `max_completion_tokens`, the Responses API's `max_output_tokens` are vLLM's `max_tokens`
# inside; its `previous_response_id` is vLLM's `response_id` in errors). Set per request by
# the route (api/generation.py); `from_vllm` names the field as the client sent it.
CLIENT_PARAMS: ContextVar[Mapping[str, str] | None] = ContextVar("CLIENT_PARAMS", default=None)


def from_vllm(status: int, message: str, param: str | None = None) -> SluiceError:
    """The sluice error for an error vLLM's serving layer reported with HTTP `status`, its
    `param` (and the field's name in the message) as the client named it (`CLIENT_PARAMS`)."""
    if param is None and (named := VLLM_PARAMETER.search(message)) is not None:
        param = named.group(1) or named.group(2)
    names = CLIENT_PARAMS.get()
    if names and param is not None and param in names:
        client = names[param]
        message = re.sub(rf"\b{re.escape(param)}\b", client, message)
        param = client
    if status == 400 or status == 422:
        if "maximum context length" in message or "longer than the maximum model length" in (
            message
        ):
            return ContextLengthExceeded(message, param=param or "messages")
        return InvalidRequest(message, param=param)
    if status == 404:
        if param == "model" or "model" in message.lower():
            return ModelNotFound(message, param="model")
        return NotFound(message, param=param)
    if status == 501:
        return NotSupported(message, param=param)
    if status == 503:
        return ServiceUnavailable(message, retry_after_s=1)
    logger.error("vLLM reported an internal error (%d): %s", status, message)
    return InternalError("The server had an error while processing your request.")


def from_exception(exc: BaseException) -> SluiceError:
    """A sluice error for any exception, classified as vLLM's own server would
    (`vllm.entrypoints.serve.create_error_response`); internals are logged, not sent."""
    if isinstance(exc, SluiceError):
        return exc
    if type(exc).__name__ == "EngineDeadError":
        return EngineDead(
            "The inference engine has failed and the server is restarting.", retry_after_s=10
        )
    try:
        from vllm.entrypoints.serve import create_error_response
    except ImportError:  # pragma: no cover - vLLM is always there when it raised
        return as_sluice_error(exc)
    if not isinstance(exc, Exception):
        return as_sluice_error(exc)
    if isinstance(exc, ValidationError):
        # vLLM validates parts of a request (message content parts) with pydantic itself
        return validation_error(RequestValidationError(exc.errors(include_url=False)))
    error = create_error_response(exc).error
    if error.code >= 500:
        logger.error("unexpected error", exc_info=exc)
    return from_vllm(error.code, error.message, error.param)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """Turn pydantic's first complaint into a one-sentence 400 naming the field."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest("The request body is invalid.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload."
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type's name to the location ("prompt.str",
    # "messages.0.ChatCompletionUserMessageParam.content", "prompt.list[constrained-int]");
    # field names are snake_case, so drop the parts that are not.
    loc = [part for part in loc if not UNION_MEMBER.search(part)]
    loc = [part for part in loc if part not in {"str", "int", "float", "bool", "dict", "list"}]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        if param is None:
            return InvalidRequest(
                "The request body is missing; send a JSON object with "
                "'Content-Type: application/json'."
            )
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if first.get("type") == "model_attributes_type":
        return InvalidRequest(
            "The request body must be a JSON object sent with 'Content-Type: application/json'.",
            param=param,
        )
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value for {where}: {message}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or sluice raises through the table above."""

    def respond(request: Request, exc: SluiceError) -> JSONResponse:
        record = record_of(request.scope)
        if record is not None:
            record.fail(spec_for(exc).status, error_code(exc))
        return error_response(exc)

    async def on_sluice_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SluiceError)
        return respond(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, validation_error(exc))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            body = error_body(InvalidRequest("Unknown URL. Check the path of your request."))
        else:
            body = error_body(InvalidRequest(str(exc.detail)))
        body["error"]["code"] = body["error"]["code"] or f"http_{exc.status_code}"
        return ErrorJSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, from_exception(exc))

    app.add_exception_handler(SluiceError, on_sluice_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # vLLM's request models raise its own errors from their validators (not pydantic's), and
    # its serving layer raises these for bad input: handled as vLLM's server registers them
    # (vllm/entrypoints/serve/exception_handling/register.py), inside the middleware stack.
    from vllm.exceptions import VLLMError

    for kind in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError):
        app.add_exception_handler(kind, on_unexpected)
    app.add_exception_handler(Exception, on_unexpected)
