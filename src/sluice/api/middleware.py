"""ASGI middleware: request ids, the per-request record (metrics and log line), and the
request body's size limit and text validity.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnect messages pass through
untouched.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from urllib.parse import quote

from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.sse import CLIENT_CLOSED_REQUEST
from sluice.errors import InvalidRequest, PayloadTooLarge, SluiceError, error_response
from sluice.telemetry.logging import log_request
from sluice.telemetry.metrics import Metrics
from sluice.telemetry.record import SCOPE_KEY, RequestRecord, record_of
from sluice.telemetry.tracing import UNTRACED_PATHS, ErrorRateWindow

KNOWN_ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/models",
        "/tokenize",
        "/detokenize",
    }
)
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff); pairs are fine, lone ones are not text.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

REQUEST_ID_HEADER = b"x-request-id"
# Where the request path leaves headers for the response (which backend and model answered):
# a dict in the scope's state, added to the response's start whatever sends it.
RESPONSE_HEADERS = "sluice.response_headers"


def response_headers(scope: Scope) -> dict[str, str]:
    """The headers this request's response will carry besides its own (mutable)."""
    headers: dict[str, str] = scope.setdefault("state", {}).setdefault(RESPONSE_HEADERS, {})
    return headers


def text_error(body: bytes) -> InvalidRequest | None:
    """Why `body` is not valid Unicode text, if it is not: invalid UTF-8, or a lone UTF-16
    surrogate written as a JSON escape (which Python's JSON parser accepts, but which no
    tokenizer, log line or response can carry)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON."
        )
    if SURROGATE_ESCAPE.search(body) is None:
        return None
    # Rare (non-ASCII escaped by the client): parsing joins surrogate pairs into characters,
    # so what cannot be encoded afterwards is a lone surrogate.
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return InvalidRequest(
            "The request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
            "which is not valid Unicode text."
        )
    except (ValueError, RecursionError):
        return None  # not JSON, or nested too deeply: the route reports that
    return None


# Printable ASCII: kept as it is in a header value; anything else is percent-encoded.
HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F))


def header_value(value: str) -> bytes:
    """`value` as an HTTP header value: printable ASCII as it is, any other character
    (a served model or LoRA name in Cyrillic, a control character) percent-encoded as UTF-8
    (RFC 3986), so that no name can fail to encode or split a header (RFC 9110 §5.5)."""
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    return quote(value, safe=HEADER_SAFE).encode("ascii")


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length,
    and bodies that are not valid Unicode text with 400.

    The body is read here, up to the limit, and replayed to the app; later `receive` calls
    go to the server, so disconnect detection still works.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes)."
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(too_large, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(too_large, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        invalid = text_error(body)
        if invalid is not None:
            await self._refuse(invalid, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(error: SluiceError, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        if record is not None:
            from sluice.errors import error_code, spec_for

            record.fail(spec_for(error).status, error_code(error))
        await error_response(error)(scope, receive, send)


class RequestMiddleware:
    """Each request's id and record. The id: an incoming `x-request-id` (or a new one),
    echoed on the response. The record (`metrics` given, i.e. telemetry on): a
    `RequestRecord` in the scope, turned into metrics and the one log line when the
    response is done. Probes, `/metrics` and `/version` are not counted. One middleware,
    so a streamed response's chunks pass one wrapper, not two."""

    UNTRACKED = frozenset(f"/{path}" for path in UNTRACED_PATHS)

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics | None = None,
        errors: ErrorRateWindow | None = None,
        on_record: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.errors = errors
        self.on_record = on_record

    @staticmethod
    def endpoint(path: str) -> str:
        """A bounded label for `path`."""
        if path in KNOWN_ENDPOINTS:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{id}"
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"")
        request_id = incoming.decode("latin-1")[:128] if incoming else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))
        http_status: int | None = None
        disconnected = False

        async def send_with_id(message: Message) -> None:
            nonlocal http_status
            if message["type"] == "http.response.start":
                http_status = message["status"]
                extra = state.get(RESPONSE_HEADERS) or {}
                message["headers"] = [
                    *message.get("headers", ()),
                    id_header,
                    *((k.encode("latin-1"), header_value(v)) for k, v in extra.items()),
                ]
            await send(message)

        async def receive_watched() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        if self.metrics is None or scope["path"] in self.UNTRACKED:
            await self.app(scope, receive, send_with_id)
            return
        record = RequestRecord(
            request_id=request_id,
            endpoint=self.endpoint(scope["path"]),
            started=time.perf_counter(),
        )
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
        record.trace_context = otel_context.get_current()
        state[SCOPE_KEY] = record
        try:
            await self.app(scope, receive_watched, send_with_id)
        finally:
            if record.status is None and http_status is None and disconnected:
                # Gone before any answer (e.g. while uploading the body): the client's doing.
                record.fail(CLIENT_CLOSED_REQUEST, "client_closed_request")
            status = record.status or http_status or 500
            record.status = status
            finished = time.perf_counter()
            if self.errors is not None:
                self.errors.observe(status >= 500)
            self.metrics.observe(record, finished)
            if self.on_record is not None:
                self.on_record(record)
            log_request(record, finished)
