"""`SSEResponse`: a stream of vLLM's SSE frames sent to the client under the exchange's rules.

vLLM's serving layer returns an async generator of ready-made `data: ...` frames. Sending
them is the one place that decides:

- **when the stream starts.** The HTTP status is held until the engine has accepted every
  engine request (vLLM validated and queued them: `Exchange.acceptance`), or the stream ended
  or failed first. A request that is invalid (vLLM's validation in `add_request`, the
  gateway's reservation) is refused with its status and OpenAI's error body, never a 200
  with an error event. Frames produced before acceptance (none for chat and completions)
  are held and sent after the status.
- **errors inside the stream.** vLLM reports them as an `{"error": ...}` frame in its own
  shape; each is rewritten in OpenAI's (errors.py), using the exchange's own reason when it
  stopped the request. The stream still ends with `data: [DONE]`.
- **the time limit, the drain's cut-off and disconnects.** Past the exchange's deadline the
  stream gets a 504 error frame and `[DONE]` (a 503 `draining` one when a drain that ran out
  of time cuts it off); a client that goes away cancels the stream, which aborts the
  engine requests (vLLM's generator and `Exchange.close`). The exchange closes exactly once
  when the response ends, whatever ended it.
- **keep-alive comments** (`: ping`) every `--sse-keep-alive-interval` seconds (sluice's
  default: 15) while the stream has nothing to send: queued in the engine, in prefill,
  between tokens. Proxies in front (Fly, Render, ingresses, load balancers) close
  connections idle past their timeout (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import anyio
import anyio.abc
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from sluice.engine.protocol import REQUEST_OBSERVER, RequestObserver
from sluice.errors import (
    SluiceError,
    error_body,
    error_code,
    error_response,
    from_exception,
    from_vllm,
    spec_for,
)
from sluice.lifecycle import Lifecycle
from sluice.telemetry.record import RequestRecord

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
ERROR_PREFIX = 'data: {"error"'
# Where the app puts the server's own `send` (app.py: SluiceApp).
SERVER_SEND = "sluice.server_send"
DONE = b"data: [DONE]\n\n"
# The keep-alive comment sse-starlette sends; SSE clients ignore comment lines (WHATWG HTML,
# server-sent events, "Interpreting an event stream").
PING = b": ping\n\n"
# Not a status a client ever reads (it has gone); it marks the request in logs and metrics.
CLIENT_CLOSED_REQUEST = 499


class StreamOwner(Protocol):
    """What owns a stream's request: `Exchange` (the engine) or `UpstreamCall` (an
    upstream backend)."""

    record: RequestRecord | None
    error: SluiceError | None
    acceptance: asyncio.Event
    deadline: float  # event-loop time
    lifecycle: Lifecycle

    @property
    def headers(self) -> dict[str, str]: ...

    def timed_out(self) -> SluiceError: ...

    async def close(self, error: BaseException | None = None) -> None: ...


class ClientDisconnected(Exception):
    """The client went away before the response was complete (recorded on spans; never
    sent, there is nobody to send it to)."""


class OwnedResponse(Response):
    """A whole JSON body whose owner closes (settles, releases, ends its span) once the body
    is sent, or whatever ended the sending: the settlement's store round trip is not part of
    the latency the client sees. Whoever reads the body instead of sending it (a cascade
    judging an answer) closes the owner itself with `close_owner`."""

    def __init__(self, content: bytes | str, owner: StreamOwner) -> None:
        super().__init__(content, media_type="application/json", headers=owner.headers)
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await self.owner.close(error)

    async def close_owner(self) -> None:
        await self.owner.close()


class SSEResponse(Response):
    """The ASGI response for one exchange's stream of vLLM frames (module docstring)."""

    def __init__(
        self,
        frames: AsyncGenerator[str, None],
        exchange: StreamOwner,
        keep_alive_s: float = 0.0,
        observer: RequestObserver | None = None,
        responses_api: bool = False,
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.frames = frames
        # a Responses API stream: its events are typed and numbered, its error is an `error`
        # event (OpenAI's ResponseErrorEvent) and it has no `[DONE]`
        self.responses_api = responses_api
        self._events = 0  # events sent: the next one's `sequence_number`
        self.exchange = exchange
        self.keep_alive_s = keep_alive_s
        self.observer = observer
        self.started = False
        self.finished = False  # the last byte was sent
        self.disconnected = False
        self._pull: asyncio.Future[str] | None = None  # an advance of `frames` under way
        self._last_sent = 0.0  # event-loop time of the last bytes sent
        self._pings = anyio.CancelScope()  # cancelled before the last message (`_stop_pings`)
        self._clock = time.monotonic  # the event loop's clock once the stream starts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        REQUEST_OBSERVER.set(self.observer)  # engine requests the stream starts are observed
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                with anyio.CancelScope(deadline=self.exchange.deadline) as limit:
                    cut = False

                    def cut_off() -> None:  # a drain ran out of time (lifecycle.py)
                        nonlocal cut
                        cut = True
                        limit.cancel()

                    unregister = self.exchange.lifecycle.on_cut_off(cut_off)
                    try:
                        await self._stream(scope, receive, send, group)
                    finally:
                        unregister()
                if limit.cancel_called and not self.disconnected:
                    error = Lifecycle.cut_off_error() if cut else self.exchange.timed_out()
                    await self._fail(error, scope, receive, send)
                group.cancel_scope.cancel()
        except Exception as exc:
            error = exc
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if self._pull is not None and not self._pull.done():
                    self._pull.cancel()
                    with contextlib.suppress(BaseException):
                        await self._pull
                await self.frames.aclose()
                if self.disconnected:
                    self._note(CLIENT_CLOSED_REQUEST, "client_closed_request")
                    error = error or ClientDisconnected()
                await self.exchange.close(error)

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finished:  # a client that leaves after the last byte did not disconnect
            self.disconnected = True
            scope.cancel()

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, group: anyio.abc.TaskGroup
    ) -> None:
        held, pending, refused = await self._until_accepted()
        if refused is not None:
            await self._fail(refused, scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *SSE_HEADERS,
                    *((k.encode(), v.encode()) for k, v in self.exchange.headers.items()),
                ],
            }
        )
        self.started = True
        self._clock = asyncio.get_running_loop().time
        self._last_sent = self._clock()
        # The chunks go straight to the server: the middlewares between (error handling,
        # the request record, the server span) act on the first and last messages only,
        # and a wrapper per chunk would cost CPU for every streamed token.
        chunk_send: Send = scope.get(SERVER_SEND, send)
        for frame in held:
            await self._send_frame(frame, chunk_send)
        if self.keep_alive_s > 0:
            group.start_soon(self._ping_while_idle, chunk_send)
        try:
            if pending is not None:
                await self._send_frame(await pending, chunk_send)
            async for frame in self.frames:
                await self._send_frame(frame, chunk_send)
        except StopAsyncIteration:
            pass
        except Exception as exc:  # a serving generator that does not catch its errors
            await self._fail(self.exchange.error or from_exception(exc), scope, receive, send)
            return
        self._stop_pings()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping_while_idle(self, send: Send) -> None:
        """Send `: ping` whenever nothing was sent for `keep_alive_s` (one sleeping task per
        stream: nothing is added to the per-chunk path)."""
        with self._pings:
            while True:
                await asyncio.sleep(max(0.0, self._last_sent + self.keep_alive_s - self._clock()))
                if self.finished or self.disconnected:
                    return
                if self._clock() - self._last_sent >= self.keep_alive_s:
                    self._last_sent = self._clock()
                    await send({"type": "http.response.body", "body": PING, "more_body": True})

    def _stop_pings(self) -> None:
        """No ping after this: one blocked in the server's send (a slow reader) is cancelled
        before it writes, so it cannot follow the response's last message."""
        self.finished = True
        self._pings.cancel()

    async def _send_frame(self, frame: str, send: Send) -> None:
        self._last_sent = self._clock()
        self._events += 1
        if frame.startswith(ERROR_PREFIX):
            frame = self._openai_error_frame(frame)
        await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})

    async def _until_accepted(
        self,
    ) -> tuple[list[str], asyncio.Future[str] | None, SluiceError | None]:
        """Pull frames until the engine accepted the request: `(held frames, the pull still
        under way, None)`, or `(…, …, error)` when the stream failed before that."""
        held: list[str] = []
        exchange = self.exchange
        while True:
            pull: asyncio.Future[str] = asyncio.ensure_future(anext(self.frames))
            self._pull = pull
            accepted: asyncio.Future[Any] = asyncio.ensure_future(exchange.acceptance.wait())
            waiting: list[asyncio.Future[Any]] = [pull, accepted]
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                accepted.cancel()
            if not pull.done():
                return held, pull, None
            try:
                frame = pull.result()
            except StopAsyncIteration:
                return held, None, exchange.error
            except Exception as exc:  # a serving generator that does not catch its errors
                return held, None, exchange.error or from_exception(exc)
            if frame.startswith(ERROR_PREFIX):
                return held, None, exchange.error or _vllm_error(frame)
            held.append(frame)
            if exchange.acceptance.is_set():
                return held, None, None

    def _openai_error_frame(self, frame: str) -> str:
        error = self.exchange.error or _vllm_error(frame)
        self._note(spec_for(error).status, error_code(error))
        return _frame(error_body(error))

    async def _fail(self, error: SluiceError, scope: Scope, receive: Receive, send: Send) -> None:
        self._note(spec_for(error).status, error_code(error))
        self._stop_pings()
        if not self.started:
            await error_response(error)(scope, receive, send)
            return
        with contextlib.suppress(OSError):
            if self.responses_api:
                # OpenAI's ResponseErrorEvent; the stream ends there (this API has no [DONE])
                body = error_body(error)["error"]
                event = {
                    "type": "error",
                    "code": body["code"],
                    "message": body["message"],
                    "param": body["param"],
                    "sequence_number": self._events,
                }
                frame = ("event: error\n" + _frame(event)).encode()
                await send({"type": "http.response.body", "body": frame, "more_body": False})
                return
            await send(
                {
                    "type": "http.response.body",
                    "body": _frame(error_body(error)).encode(),
                    "more_body": True,
                }
            )
            await send({"type": "http.response.body", "body": DONE, "more_body": False})

    def _note(self, status: int, code: str) -> None:
        record = self.exchange.record
        if record is not None and record.status is None:
            record.fail(status, code)


def _frame(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def _vllm_error(frame: str) -> SluiceError:
    """The sluice error for one of vLLM's `data: {"error": ...}` frames."""
    error = json.loads(frame.removeprefix("data: "))["error"]
    code = error.get("code")
    status = code if isinstance(code, int) else 500
    return from_vllm(status, str(error.get("message", "")), error.get("param"))


async def until_disconnected(receive: Receive) -> None:
    """Return when the client has gone away (the request body was already read)."""
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
