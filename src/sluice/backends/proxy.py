"""`UpstreamCall`: one client request served by upstream backends, from reservation to
settlement.

`open` runs the attempts: for each model of the chain (the model, then its fallbacks) it
picks the least-loaded available upstream (backends/registry.py) and sends the request; a
failure (`UpstreamFailure`: connection error, timeout, 5xx, 429, a stream cut before its
first event or opening with a 5xx-like error event) is retried on that model with
exponential backoff and jitter (tenacity) up to `routing.retries` times while the retry
budget allows, then the next model is tried. Nothing is retried once a byte went to the
client: a stream counts as answered at its first event, and the client's status is sent only
then. A 4xx from an upstream is the request's own fault and is answered as it is (status and
message), never retried. When every attempt failed: the model's static fallback message if
one is configured (header `x-sluice-fallback: static`), else the last failure as an error in
OpenAI's shape.

Around the attempts it owns what `Exchange` owns for the engine: the lifecycle slot (upstream
requests are served while the engine loads), the gateway's reservation (the prompt's tokens
estimated from its text, plus `max_tokens * n`, priced at the answering backend's prices),
the record (model that answered, `backend`, `attempt`, first-token time, gaps) and one
client span per attempt (`traceparent` goes to the upstream). Streams always ask the
upstream for usage (`stream_options.include_usage`) so settlement and metrics use the
upstream's own counts; the usage chunk is dropped again when the client did not ask.
`close` settles once from that usage (estimates where an upstream sent none). A stream is
the upstream's success for its breaker only once it ended whole; one that breaks, stalls
past `first_token_s` between events or reports a 5xx-like error event is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp
import anyio
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.responses import Response
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from sluice.api.sse import ClientDisconnected, OwnedResponse
from sluice.backends.registry import Backends
from sluice.backends.upstream import (
    Upstream,
    UpstreamFailure,
    failure_of_status,
    message_of,
    read_capped,
)
from sluice.config import RoutingSettings, Settings
from sluice.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RateLimitExceeded,
    RequestTimedOut,
    ServiceUnavailable,
    SluiceError,
    UpstreamError,
    error_body,
    request_timed_out,
)
from sluice.gateway.auth import Principal
from sluice.gateway.service import Gateway, Ticket
from sluice.lifecycle import Lifecycle
from sluice.telemetry.metrics import Metrics
from sluice.telemetry.record import RequestRecord

logger = logging.getLogger(__name__)

# OpenAI's rule of thumb: a token is about 4 characters of English text; each chat message
# adds about 4 tokens of framing ("How to count tokens with tiktoken", OpenAI Cookbook).
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
RETRY_BUDGET_WINDOW_S = 10.0
RETRY_BUDGET_FLOOR = 3  # retries always allowed per window, so a quiet server still retries
MAX_ERROR_BODY = 65_536  # of an upstream's error answer read (the rest is dropped)
MAX_LINE_BYTES = 64 * 1024 * 1024  # one SSE line (a whole answer in `response.completed`)
MAX_EVENT_BYTES = MAX_LINE_BYTES  # one SSE event, its data lines together
MAX_BODY_BYTES = MAX_LINE_BYTES  # a whole answer that is not streamed (embeddings included)
# Usage an upstream reports is trusted up to this many prompt tokens (above any model's
# context length today): an upstream's bug or overflow must not charge a key 10**30 tokens.
# Completion tokens are bounded exactly, by the `max_tokens` sent times the outputs asked.
MAX_PROMPT_TOKENS = 1 << 24
PATHS = {
    "chat": "/chat/completions",
    "text_completion": "/completions",
    "generate_content": "/responses",
    "embeddings": "/embeddings",
}
STREAMS_USAGE = {"chat", "text_completion"}  # endpoints with stream_options.include_usage


class RetryBudget:
    """Retries at most `ratio` of the requests of the last `window_s` seconds (plus
    `RETRY_BUDGET_FLOOR`), so an outage cannot multiply the load on the backends (the retry
    budget of Finagle and Envoy)."""

    def __init__(self, ratio: float, window_s: float = RETRY_BUDGET_WINDOW_S) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _prune(self, now: float) -> None:
        for times in (self._requests, self._retries):
            while times and times[0] < now - self.window_s:
                times.popleft()

    def request(self) -> None:
        """Count one request."""
        now = time.monotonic()
        self._prune(now)
        self._requests.append(now)

    def try_retry(self) -> bool:
        """Take one retry from the budget, or False when it is spent."""
        now = time.monotonic()
        self._prune(now)
        if len(self._retries) >= self.ratio * len(self._requests) + RETRY_BUDGET_FLOOR:
            return False
        self._retries.append(now)
        return True


# An image or audio part of a message counts this many tokens, whatever its bytes: its data
# URL's base64 is no measure of what a model reads (OpenAI bills a high-detail 1024x1024
# image at 765 tokens, a 2048x2048 one at 1,105; a 1 MB data URL would be ~330k "tokens").
MEDIA_PART_TOKENS = 1105
MEDIA_PARTS = frozenset({"image_url", "input_image", "input_audio", "audio_url", "video_url"})


def _without_media(node: Any, media: list[int]) -> Any:
    """`node` with every media part (`MEDIA_PARTS`) left out, one entry in `media` each."""
    if isinstance(node, list):
        return [_without_media(item, media) for item in node]
    if isinstance(node, dict):
        if node.get("type") in MEDIA_PARTS:
            media.append(1)
            return None
        return {key: _without_media(value, media) for key, value in node.items()}
    return node


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a body, estimated from its text (`CHARS_PER_TOKEN`): chat messages
    (plus `TOKENS_PER_MESSAGE` each, and `MEDIA_PART_TOKENS` per image or audio part),
    `prompt`, `input`, `instructions`; token-id lists count one per id. Only the reservation
    uses it; settlement uses the upstream's usage."""
    chars = 0
    tokens = 0
    media: list[int] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens += TOKENS_PER_MESSAGE * len(messages)
        chars += len(json.dumps(_without_media(messages, media), ensure_ascii=False))
    for field in ("prompt", "input", "instructions"):
        value = body.get(field)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            flat = [x for item in value for x in (item if isinstance(item, list) else [item])]
            tokens += sum(1 for x in flat if isinstance(x, int))
            texts = [x for x in flat if not isinstance(x, int)]
            chars += sum(
                len(json.dumps(_without_media(x, media), ensure_ascii=False)) for x in texts
            )
    return tokens + MEDIA_PART_TOKENS * len(media) + math.ceil(chars / CHARS_PER_TOKEN)


def usage_of(obj: Any) -> tuple[int, int] | None:
    """`(prompt, completion)` tokens of an OpenAI body or chunk: chat/completions/embeddings
    `usage` or the Responses API's `usage` / `response.usage` (`input_tokens`)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not _count(prompt) or not _count(completion):
        return None
    return prompt, completion


def _count(value: Any) -> TypeGuard[int]:
    """A token count: an int (not a bool) of at least 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class Answer:
    """What a successful attempt got: a body (not streamed) or an open stream."""

    upstream: Upstream
    model: str
    attempt: int
    body: bytes | None = None
    stream: aiohttp.ClientResponse | None = None
    lines: AsyncIterator[str] | None = None
    first_event: str | None = None


class LocalHandoff(Exception):
    """The chain reached a model of the in-process engine at `index`, after `attempts`
    attempts on upstreams."""

    def __init__(self, index: int, attempts: int = 0) -> None:
        super().__init__(index)
        self.index = index
        self.attempts = attempts


class _Broken(Exception):
    """A stream that broke in a way the relay saw (not the connection)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class UpstreamRateLimited(RateLimitExceeded):
    """Every attempt ended in an upstream's 429: a 429 for the client, but the upstream's
    limit, not the key's (a cascade escalates past it)."""


class _Unavailable(Exception):
    """No upstream of a model can take a request now (all down, open or at their cap)."""


def static_message(
    routing: RoutingSettings, model: str | None, operation: str
) -> tuple[str, str] | None:
    """`(model, its static fallback message)` when one may answer: configured for `model`,
    on chat or completions (the only answers it can take the shape of)."""
    if model is None or operation not in ("chat", "text_completion"):
        return None
    message = routing.static_fallback.get(model)
    return None if message is None else (model, message)


def wants_usage(body: dict[str, Any]) -> bool:
    """The client asked for a streamed usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def static_response(
    body: dict[str, Any],
    operation: str,
    model: str,
    message: str,
    reason: str,
    metrics: Metrics | None,
    response_headers: dict[str, str],
    headers: dict[str, str],
) -> Response:
    """The deterministic answer of last resort for `body` (chat or completions, whole or
    streamed as it asked): `message` as `model`'s, zero usage, marked `x-sluice-fallback:
    static` and counted in `sluice_static_fallbacks_total`; `reason` is logged."""
    if metrics is not None:
        metrics.static_fallbacks.labels(model).inc()
    logger.warning(
        "every backend of %s failed (%s); answering with its static fallback", model, reason
    )
    created = int(time.time())
    ident = f"fallback-{uuid.uuid4().hex}"
    chat = operation == "chat"
    response_headers.update(
        {"x-sluice-fallback": "static", "x-sluice-backend": "static", "x-sluice-model": model}
    )
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": message},
            "finish_reason": "stop",
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": message, "finish_reason": "stop", "logprobs": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    obj = "chat.completion" if chat else "text_completion"
    head = {"id": ident, "object": obj, "created": created, "model": model}
    stream = body.get("stream") is True
    if not stream:
        whole = {**head, "choices": [choice], "usage": usage}
        return Response(json.dumps(whole), media_type="application/json", headers=headers)
    if chat:
        delta = {"role": "assistant", "content": message}
        choice = {"index": 0, "delta": delta, "finish_reason": "stop", "logprobs": None}
        head["object"] = "chat.completion.chunk"
    chunk: dict[str, Any] = {**head, "choices": [choice]}
    frames = [f"data: {json.dumps(chunk)}\n\n"]
    if wants_usage(body):
        frames.append(f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n")
    frames.append("data: [DONE]\n\n")
    return Response("".join(frames), media_type="text/event-stream", headers=headers)


class UpstreamCall:
    """One request through upstream backends (module docstring)."""

    def __init__(
        self,
        *,
        body: dict[str, Any],
        operation: str,
        chain: tuple[str, ...],
        requested: str,
        principal: Principal,
        settings: Settings,
        backends: Backends,
        gateway: Gateway,
        lifecycle: Lifecycle,
        budget: RetryBudget,
        metrics: Metrics | None,
        record: RequestRecord | None,
        tracer: trace.Tracer,
        request_id: str,
        max_tokens: int,
        response_headers: dict[str, str],
        outputs: int = 1,
        static_model: str | None = None,
    ) -> None:
        self.body = body
        self.operation = operation
        self.chain = chain
        self.requested = requested
        self.principal = principal
        self.routing: RoutingSettings = settings.routing
        self.backends = backends
        self.gateway = gateway
        self.lifecycle = lifecycle
        self.budget = budget
        self.metrics = metrics
        self.record = record
        self.tracer = tracer
        self.request_id = request_id
        self.max_tokens = max_tokens
        # `body` comes checked (api/generation.py: `stream` a bool, `n` an int)
        self.stream = body.get("stream") is True
        self.client_wants_usage = wants_usage(body)
        self.outputs = outputs  # completions the answer may hold: n times the prompts
        # whose static fallback message answers when every attempt failed: the first model
        # of the request's whole chain that has one, whichever part of it this call runs
        # (None for a cascade's tries: they escalate)
        self.static_model = static_model
        self.error: SluiceError | None = None
        self.acceptance = asyncio.Event()
        self.timeout_s = settings.limits.request_timeout_s
        self.deadline = asyncio.get_running_loop().time() + self.timeout_s
        self.ticket: Ticket | None = None
        self.answer: Answer | None = None
        self.usage: tuple[int, int] | None = None
        self.prompt_estimate = estimate_prompt_tokens(body)
        # output tokens counted while no usage came: one per event with output relayed, or
        # estimated from a whole answer's text
        self.output_tokens = 0
        self.response_headers = response_headers
        self._slot = False
        self._closed = False
        self._span: trace.Span | None = None
        self._probe = False  # the answering attempt was a half-open breaker's probe
        # an attempt cancelled before it answered, counted when the call closes
        self._unanswered: tuple[Upstream, str, int] | None = None
        self.last_failure: UpstreamFailure | None = None  # of any attempt, the latest
        self._done = False  # the stream's end arrived: `[DONE]`, or a response's last event
        self._failure_counted = False  # a cut stream counted its attempt's failure already

    # -- the exchange interface SSEResponse uses -----------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers (which backend and model answered go in
        `response_headers`, added to whatever response the request gets)."""
        return dict(self.ticket.headers) if self.ticket is not None else {}

    def timed_out(self) -> RequestTimedOut:
        return request_timed_out(self.timeout_s)

    # -- opening ------------------------------------------------------------------------------
    async def reserve(self) -> None:
        """Take a lifecycle slot and reserve quota (503 draining, 429 limits)."""
        self.lifecycle.admit(needs_engine=False)
        self._slot = True
        self.budget.request()
        first = self.chain[0]
        self.ticket = await self.gateway.reserve(
            self.principal,
            first,
            self.prompt_estimate,
            self.max_tokens * self.outputs,
            price=self.backends.price_of(first),
            engine=False,
        )

    async def open(self) -> Answer | Response:
        """Run the attempts (module docstring): the first answer, the static fallback, or
        raise the error to answer with. `LocalHandoff` when the chain reaches the engine."""
        attempt = 0
        tried: list[Upstream] = []  # a retry goes to another upstream first
        for index, model in enumerate(self.chain):
            if self.backends.is_local(model):
                raise LocalHandoff(index, attempt)
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(UpstreamFailure),
                stop=self._stop_retrying,
                wait=wait_exponential_jitter(
                    multiplier=self.routing.retry_backoff_s,
                    max=max(1.0, self.routing.retry_backoff_s),
                    jitter=self.routing.retry_backoff_s,
                ),
                reraise=True,
            )
            # A failure (UpstreamFailure) or no backend left to try (_Unavailable, e.g. the
            # retry found the breaker open): the next model; the latest failure is the
            # error to answer with.
            with contextlib.suppress(UpstreamFailure, _Unavailable):
                async for trial in retrying:
                    with trial:
                        upstream = self.backends.pick(model, tried)
                        if upstream is None:
                            raise _Unavailable(model)
                        tried.append(upstream)
                        attempt += 1
                        answer = await self._attempt(upstream, model, attempt)
                        self._answered(answer)
                        return answer
        last = self.last_failure
        static = static_message(self.routing, self.static_model, self.operation)
        if static is not None:
            reason = last.message if last is not None else "none available"
            return static_response(
                self.body,
                self.operation,
                *static,
                reason,
                self.metrics,
                self.response_headers,
                self.headers,
            )
        raise self._error_of(last)

    def _stop_retrying(self, state: RetryCallState) -> bool:
        return state.attempt_number > self.routing.retries or not self.budget.try_retry()

    def _payload(self, upstream: Upstream, model: str) -> dict[str, Any]:
        payload = dict(self.body)
        payload["model"] = upstream.models[model]
        if self.stream and self.operation in STREAMS_USAGE:
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return payload

    async def _attempt(self, upstream: Upstream, model: str, attempt: int) -> Answer:
        """One request to `upstream`: its answer, or raise `UpstreamFailure` / the error."""
        span = self.tracer.start_span(
            f"{self.operation} {model}",
            context=self.record.trace_context if self.record is not None else None,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": self.operation,
                "gen_ai.system": "openai",
                "gen_ai.request.model": model,
                "sluice.backend": upstream.name,
                "sluice.attempt": attempt,
                "server.address": upstream.settings.base_url,
            },
        )
        headers = {"x-request-id": self.request_id}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        probe = upstream.begin()
        try:
            answer = await self._send(upstream, model, attempt, headers)
        except UpstreamFailure as failure:
            self.last_failure = failure
            upstream.failed(failure)
            upstream.end(probe)
            self._count(upstream, model, attempt, failure.reason)
            span.set_status(Status(StatusCode.ERROR, failure.reason))
            span.end()
            raise
        except BaseException as exc:
            upstream.end(probe)
            if isinstance(exc, SluiceError):  # the upstream answered: the request's fault
                upstream.succeeded()
                self._count(upstream, model, attempt, "refused")
            else:  # cancelled (the client left, the time limit): `close` counts it
                self._unanswered = (upstream, model, attempt)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        if answer.stream is None:
            upstream.succeeded()
        # A stream succeeds for the breaker when it ends without the upstream's fault
        # (`close`): one that always breaks after its first event must open the breaker.
        self._probe = probe
        self._span = span
        return answer

    async def _send(
        self, upstream: Upstream, model: str, attempt: int, headers: dict[str, str]
    ) -> Answer:
        timeouts = upstream.settings.timeouts
        url = upstream.url(PATHS[self.operation])
        payload = self._payload(upstream, model)
        name = upstream.name
        try:
            if not self.stream:
                # The answer comes whole when generation ends: `total_s` alone bounds it.
                limit = aiohttp.ClientTimeout(
                    total=timeouts.total_s,
                    sock_connect=timeouts.connect_s,
                    ceil_threshold=math.inf,  # exact limits (aiohttp rounds up from 5 s)
                )
                async with upstream.session.post(
                    url, json=payload, headers=headers, timeout=limit, allow_redirects=False
                ) as response:
                    if response.status == 200:
                        content = await read_capped(response.content, MAX_BODY_BYTES)
                    else:
                        content = await read_capped(response.content, MAX_ERROR_BODY, cut=True)
                self._check_status(name, response.status, content, response.headers)
                try:
                    parsed = json.loads(content)
                except (ValueError, RecursionError):
                    parsed = None
                if not isinstance(parsed, dict):
                    raise UpstreamFailure(name, "bad_answer", "its 200 is not a JSON object")
                # an error body under a 200 (some servers do): judged as its error is
                error = _error_in(parsed, ANSWER_KEYS) if parsed.get("error") is not None else None
                if error is not None:
                    self._check_error(name, error)
                self.usage = usage_of(parsed)
                if self.usage is None:  # settled from estimates (`_used`)
                    self.output_tokens = estimate_output_tokens(parsed)
                return Answer(upstream, model, attempt, body=content)
            async with asyncio.timeout(timeouts.first_token_s + timeouts.connect_s):
                stream = await upstream.session.post(
                    url, json=payload, headers=headers, allow_redirects=False
                )
                try:
                    if stream.status != 200:
                        content = await read_capped(stream.content, MAX_ERROR_BODY, cut=True)
                        self._check_status(name, stream.status, content, stream.headers)
                    if not stream.content_type.startswith("text/event-stream"):
                        raise UpstreamFailure(
                            name, "bad_answer", f"its stream is {stream.content_type}, not SSE"
                        )
                    lines = _lines(stream.content)
                    first = await _next_event(lines)
                except BaseException:
                    stream.close()
                    raise
            if first is None:
                stream.close()
                raise UpstreamFailure(name, "stream_cut", "the stream ended before any event")
            data = _data_of(first)
            error = None if data is None else _error_of_event(data)
            if error is not None:  # nothing reached the client: a failure or a refusal
                stream.close()
                self._check_error(name, error)
            return Answer(upstream, model, attempt, stream=stream, lines=lines, first_event=first)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailure(name, "connect", f"cannot connect: {exc!r}") from exc
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise UpstreamFailure(name, "timeout", "no answer within its time limit") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(name, "stream_cut", f"the connection failed: {exc!r}") from exc
        except (ValueError, RecursionError) as exc:  # not UTF-8, past a size limit
            raise UpstreamFailure(name, "bad_answer", f"its answer is broken: {exc}") from exc

    def _check_status(
        self,
        backend: str,
        status: int,
        content: bytes,
        headers: Mapping[str, str],
        body: dict[str, Any] | None = None,
    ) -> None:
        if status == 200:
            return
        if body is None:
            try:
                body = json.loads(content)
            except (ValueError, RecursionError):
                body = None
            body = body if isinstance(body, dict) else None
        failure = failure_of_status(backend, status, body, headers)
        if failure is not None:
            raise failure
        raise _refusal(backend, status, body)

    def _check_error(self, backend: str, error: dict[str, Any]) -> None:
        """Raise what an error the upstream reported in a 200 (a body, a stream's first event)
        is, by its status (`_status_of_error`), as `_check_status` judges any error."""
        self._check_status(backend, _status_of_error(error), b"", {}, {"error": error})

    def _answered(self, answer: Answer) -> None:
        self.answer = answer
        upstream, model = answer.upstream, answer.model
        if self.ticket is not None:
            self.ticket.price = upstream.price_of(model)
        self.response_headers.update(
            {
                "x-sluice-backend": upstream.name,
                "x-sluice-model": model,
                "x-sluice-attempt": str(answer.attempt),
            }
        )
        record = self.record
        if record is not None:
            record.model = model
            record.backend = upstream.name
            record.attempt = answer.attempt
            record.price = upstream.price_of(model)
        self.acceptance.set()

    def _count(self, upstream: Upstream, model: str, attempt: int, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_attempt(upstream.name, model, attempt, outcome)

    def _error_of(self, failure: UpstreamFailure | None) -> SluiceError:
        """The client's error when every attempt failed with `failure` (the last)."""
        if failure is None:
            return ServiceUnavailable(
                f"No backend of the model '{self.requested}' can take a request now (all "
                "are down, overloaded or cooling off after errors). Retry shortly.",
                retry_after_s=1,
            )
        message = f"The upstream backend failed: {failure.message}"
        if failure.reason == "status_429":
            return UpstreamRateLimited(
                f"The upstream backend is rate limiting: {failure.message}",
                retry_after_s=failure.retry_after_s or 1,
            )
        if failure.reason == "status_503":
            return ServiceUnavailable(message, retry_after_s=failure.retry_after_s or 1)
        if failure.reason == "timeout":
            return UpstreamError(message, status=504, code="upstream_timeout")
        if failure.reason == "status_4xx" and failure.status is not None:
            return _refusal(failure.backend, failure.status, failure.body)  # the 502
        return UpstreamError(message)

    # -- relaying -------------------------------------------------------------------------------
    def body_response(self, answer: Answer) -> OwnedResponse:
        """The upstream's body as it came (its usage was read in `_send`); the call closes
        once it is sent."""
        content = answer.body or b""
        if self.record is not None:
            output = self.usage[1] if self.usage is not None else self.output_tokens
            self.record.on_tokens(time.perf_counter(), output)
        return OwnedResponse(content, self)

    async def frames(self, answer: Answer) -> AsyncGenerator[str, None]:
        """The upstream's stream as SSE frames, event by event as they arrive; usage is
        captured and stripped again when the client did not ask for it."""
        assert answer.lines is not None and answer.stream is not None
        lines = answer.lines
        event = answer.first_event
        limit_s = answer.upstream.settings.timeouts.first_token_s
        clock = asyncio.get_running_loop().time
        try:
            while event is not None:
                frame = self._relay(event)
                if frame is not None:
                    yield frame
                if self._done:  # nothing follows `[DONE]`; `_finish` closes what is left
                    return
                # The socket's read timeout (`first_token_s`) bounds a silent wait; comments
                # (keep-alive pings) reset it while no event comes, so a wait that sees one
                # goes on under a timer to the same bound (none on the per-event path).
                started = clock()
                event = await _next_event(lines, until_comment=True)
                if event is COMMENT:
                    async with asyncio.timeout_at(started + limit_s):
                        event = await _next_event(lines)
            if self.operation in STREAMS_USAGE and not self._done:
                if self.error is None:
                    raise _Broken("stream_cut", "the stream ended without its [DONE]")
                yield "data: [DONE]\n\n"  # after an error event, as vLLM ends its streams
            elif self.operation == "generate_content" and not self._done and self.error is None:
                raise _Broken("stream_cut", "the stream ended before its response.completed")
        except TimeoutError as exc:
            raise self._cut(answer, "timeout", f"no event within {limit_s} s") from exc
        except aiohttp.ClientError as exc:
            raise self._cut(answer, "stream_cut", repr(exc)) from exc
        except (ValueError, RecursionError) as exc:  # not JSON where JSON belongs, not
            # UTF-8, past a size limit, nested past the parser's depth
            raise self._cut(answer, "bad_answer", str(exc)) from exc
        except _Broken as exc:
            raise self._cut(answer, exc.reason, exc.message) from None
        finally:
            _finish(answer.stream)

    def _cut(self, answer: Answer, reason: str, detail: str) -> UpstreamError:
        """A stream that broke after its first event: a failure for the breaker and the
        metrics, and the error event the client gets (nothing is retried after a byte)."""
        logger.warning("backend %s: %s (%s)", answer.upstream.name, reason, detail)
        answer.upstream.failed(UpstreamFailure(answer.upstream.name, reason, detail))
        self._count(answer.upstream, answer.model, answer.attempt, reason)
        self._failure_counted = True
        self.error = UpstreamError(
            "The upstream backend's stream broke before it ended.", code="upstream_error"
        )
        return self.error

    def _relay(self, event: str) -> str | None:
        """One event's frame for the client (None: dropped); records tokens and usage."""
        data = _data_of(event)
        if data is None:
            return event + "\n\n"
        if data == "[DONE]":
            self._done = True
            return "data: [DONE]\n\n"
        error = _error_of_event(data)
        if error is not None:
            # in OpenAI's shape, whatever the upstream's (SSEResponse sends `self.error`)
            self.error = _stream_error(error, self.answer.upstream.name if self.answer else "")
            if _status_of_error(error) >= 500 and self.answer is not None:
                upstream = self.answer.upstream
                upstream.failed(UpstreamFailure(upstream.name, "status_5xx", self.error.message))
            return "data: " + json.dumps(error_body(self.error)) + "\n\n"
        if self.operation == "generate_content" and _ends_response(data):
            self._done = True  # relayed, then nothing more is read
        if _has_output(data):
            self.output_tokens += 1
            if self.record is not None:
                self.record.on_tokens(time.perf_counter(), 1)
        if '"usage"' not in data:
            return event + "\n\n"
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("an event's data is not a JSON object")
        usage = usage_of(obj)
        if usage is not None:
            self.usage = usage
        if self.client_wants_usage or self.operation not in STREAMS_USAGE:
            return event + "\n\n"
        if obj.get("choices") == []:
            return None  # the usage chunk the client did not ask for
        obj.pop("usage", None)
        return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"

    # -- the ending ---------------------------------------------------------------------------
    async def close(self, error: BaseException | None = None) -> None:
        """Settle, release the slot and the upstream, end the span; once, shielded."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            answer = self.answer
            if answer is not None:
                if answer.stream is not None and not self._failure_counted and self.error is None:
                    # the upstream did its part (whole, or until the client left or the time
                    # limit came): a success for its breaker
                    answer.upstream.succeeded()
                answer.upstream.end(self._probe)
                if answer.stream is not None:
                    _finish(answer.stream)
                if not self._failure_counted:
                    self._count(answer.upstream, answer.model, answer.attempt, self._end(error))
            elif self._unanswered is not None:
                outcome = self._end(error)
                self._count(*self._unanswered, "error" if outcome == "ok" else outcome)
            prompt, completion = self._used(answer is not None)
            record = self.record
            if record is not None and answer is not None:
                record.prompt_tokens = prompt
                record.completion_tokens = completion
            try:
                if self.ticket is not None:
                    self.ticket.output_tokens = completion
                    await self.gateway.settle(self.ticket, prompt)
            finally:  # also when the task is cancelled (Exchange.close has the details)
                if self._slot:
                    self.lifecycle.release()
                self._end_span(prompt, completion, error)

    def _end_span(self, prompt: int, completion: int, error: BaseException | None) -> None:
        if self._span is None:
            return
        self._span.set_attributes(
            {"gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": completion}
        )
        failure = error or self.error
        if failure is not None:
            self._span.record_exception(failure)
            self._span.set_status(Status(StatusCode.ERROR, type(failure).__name__))
        self._span.end()

    def _end(self, error: BaseException | None) -> str:
        """The answering attempt's outcome (one per attempt): `ok`; `client_closed` when the
        client left (a disconnect, or sending its answer failed), which is not held against
        the upstream; `error` for the rest (the request's time limit, an error event)."""
        failure = error or self.error
        if failure is None:
            return "ok"
        if isinstance(failure, ClientDisconnected | OSError):
            return "client_closed"
        return "error"

    def _used(self, answered: bool) -> tuple[int, int]:
        """`(prompt, completion)` tokens to settle: the upstream's usage, else the estimate
        and the chunks relayed; nothing when no upstream answered."""
        if not answered:
            return 0, 0
        prompt, completion = self.usage or (self.prompt_estimate, self.output_tokens)
        most = self.max_tokens * self.outputs if self.max_tokens else completion
        if prompt > MAX_PROMPT_TOKENS or completion > most:
            logger.warning(
                "backend %s reported usage past what the request allows (%d prompt, %d "
                "completion tokens; at most %d and %d): settled at those bounds",
                self.answer.upstream.name if self.answer else "?",
                prompt,
                completion,
                MAX_PROMPT_TOKENS,
                most,
            )
        return min(prompt, MAX_PROMPT_TOKENS), min(completion, most)


def _refusal(backend: str, status: int, body: dict[str, Any] | None) -> SluiceError:
    """An upstream's 4xx that is not a failure (`failure_of_status`) as the client's error:
    its message, and its status where it is the request's fault (400 and 422 as 400, 413);
    any other is a 502."""
    error = (body or {}).get("error")
    error = error if isinstance(error, dict) else {}
    message = message_of(body) or f"HTTP {status}"
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    if status in (400, 422):
        return InvalidRequest(message, param=param, code=code)
    if status == 413:
        return PayloadTooLarge(message)
    logger.warning("backend %s refused sluice's request with %d: %s", backend, status, message)
    return UpstreamError(f"The upstream backend refused the request ({status}): {message}")


def _stream_error(error: dict[str, Any], backend: str) -> SluiceError:
    """An upstream stream's error event (`_error_of_event`), as the error sent in its place:
    a 4xx-like one (an integer `code`, vLLM's) as the upstream's refusal would be."""
    status = _status_of_error(error)
    if status < 500 and status != 429:
        return _refusal(backend, status, {"error": error})
    message = str(error.get("message") or "The upstream backend failed while streaming.")
    code = error.get("code")
    return UpstreamError(message, code=code if isinstance(code, str) else "upstream_error")


def _error_of_event(data: str) -> dict[str, Any] | None:
    """The error an event's data reports, if it is an error event: OpenAI's and vLLM's
    `{"error": {...}}`, or `{"error": "text"}` (Hugging Face TGI's); None for any other
    event (a Responses API stream's `error` events are its own shape and pass as they are)."""
    if '"error"' not in data:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return _error_in(obj, ("choices", "type"))


# The keys of an answer: a body holding one of them is an answer, even with an `error` key.
ANSWER_KEYS = ("choices", "data", "output", "id")


def _error_in(obj: Any, answer_keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The error a parsed event or body reports (`{"error": {...}}`, or TGI's
    `{"error": "text"}` as `{"message": ...}`); None if it is not an object, has no `error`
    or holds one of `answer_keys` (then it is an answer that mentions an error)."""
    if not isinstance(obj, dict) or "error" not in obj or any(k in obj for k in answer_keys):
        return None
    error = obj["error"]
    return error if isinstance(error, dict) else {"message": str(error)}


def _status_of_error(error: dict[str, Any]) -> int:
    """The HTTP status an error event stands for: its integer `code` (vLLM's) when that is
    one, else 500 (a failure of the upstream)."""
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 500


def _data_of(event: str) -> str | None:
    """The data of an SSE event (its `data:` lines joined), or None if it has none."""
    if event.startswith("data: ") and "\n" not in event:
        return event[6:]
    parts = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
    return "\n".join(parts) if parts else None


# A chunk's generated text: chat content, reasoning, tool-call arguments, completion text,
# a Responses API text delta; a non-empty string, however the JSON is spaced.
OUTPUT_TEXT = re.compile(
    r'"(?:content|reasoning_content|reasoning|text|arguments|delta)"\s*:\s*"(?!")'
)
# Where a whole answer's generated text is: under `choices` (chat, completions) or `output`
# (Responses API), in these fields.
OUTPUT_FIELDS = frozenset({"content", "reasoning_content", "reasoning", "text", "arguments"})


def _has_output(data: str) -> bool:
    """A chunk carrying generated text (`OUTPUT_TEXT`), found without parsing it: the
    per-chunk path stays cheap."""
    return OUTPUT_TEXT.search(data) is not None


def estimate_output_tokens(answer: dict[str, Any]) -> int:
    """Output tokens of a whole answer that came without `usage`, estimated from its text
    (`OUTPUT_FIELDS` under `choices` or `output`, `CHARS_PER_TOKEN`), so that an upstream
    that reports no usage is not free for budgets and TPM."""
    chars = 0
    pending: list[Any] = [answer.get("choices"), answer.get("output")]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in OUTPUT_FIELDS and isinstance(value, str):
                    chars += len(value)
                elif isinstance(value, dict | list):
                    pending.append(value)
    return math.ceil(chars / CHARS_PER_TOKEN)


RESPONSE_ENDS = ("response.completed", "response.failed", "response.incomplete")


def _ends_response(data: str) -> bool:
    """Whether an event's data is one of the Responses API's terminal events (OpenAI's
    reference: a response stream ends with `response.completed`, `.failed` or `.incomplete`;
    it has no `[DONE]`)."""
    if not any(kind in data for kind in RESPONSE_ENDS):
        return False
    obj = json.loads(data)
    return isinstance(obj, dict) and obj.get("type") in RESPONSE_ENDS


COMMENT = ":"  # what `_next_event(until_comment=True)` returns for a comment line
DONE_EVENT = "data: [DONE]"


async def _next_event(lines: AsyncIterator[str], until_comment: bool = False) -> str | None:
    """The next SSE event (its lines, comments dropped), or None at the end; with
    `until_comment`, `COMMENT` for a comment that comes before the event's first line.

    An event the stream ends in before its blank line is not one: WHATWG's event-stream
    parsing discards it ("the incomplete event is not dispatched"), as the OpenAI SDK does; a
    connection cut mid-event must not reach the client as a whole event. Only a bare
    `data: [DONE]` is taken without its blank line (it carries nothing that can be cut)."""
    parts: list[str] = []
    size = 0
    async for line in lines:
        if line:
            if not line.startswith(":"):
                parts.append(line)
                size += len(line)
                if size > MAX_EVENT_BYTES:
                    raise ValueError(f"an event of the stream is longer than {MAX_EVENT_BYTES}")
            elif until_comment and not parts:
                return COMMENT
        elif parts:
            return "\n".join(parts)
    return DONE_EVENT if parts == [DONE_EVENT] else None


# SSE's line ends: CRLF, LF or a lone CR (WHATWG HTML, "Parsing an event stream").
LINE_END = re.compile(rb"\r\n|\r|\n")


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The lines of a response body as they arrive, without their line ends (`LINE_END`),
    up to `MAX_LINE_BYTES` long (aiohttp's own `readline` refuses lines past its 64 KiB
    buffer, and a Responses API `response.completed` event carries the whole answer on one
    line). Raises ValueError for a longer line or bytes that are not UTF-8."""
    pending = bytearray()
    scanned = 0  # pending[:scanned] holds no line end: each byte is searched once
    after_cr = False  # the data so far ended in a CR: an LF next completes that CRLF
    async for data in content.iter_any():
        if after_cr and data.startswith(b"\n"):
            data = data[1:]
        pending += data
        start = 0
        for end in LINE_END.finditer(pending, scanned):
            if end.start() - start > MAX_LINE_BYTES:
                break
            yield pending[start : end.start()].decode()
            start = end.end()
        after_cr = start == len(pending) and pending.endswith(b"\r")
        del pending[:start]
        scanned = len(pending)
        if scanned > MAX_LINE_BYTES:
            raise ValueError(f"a line of the stream is longer than {MAX_LINE_BYTES} bytes")
    if pending:
        yield pending.removesuffix(b"\r").decode()


def _finish(response: aiohttp.ClientResponse) -> None:
    """Give the connection back when the body was read to its end; else close it (how the
    upstream learns that nobody wants the rest: sluice and vLLM abort the request)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()
