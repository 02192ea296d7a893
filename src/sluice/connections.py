"""Connection limits for the HTTP server: deadlines for a request's headers and body, and a
cap on open connections.

uvicorn times out idle keep-alive connections but nothing else: a client that opens a
connection and sends nothing, or trickles its headers or body a byte at a time (slowloris,
slow POST), holds a file descriptor and memory for as long as it likes, and enough of them
exhaust the server. `guarded_protocol` returns uvicorn's httptools protocol with three
limits, the ones Node's HTTP server (`headersTimeout`, `requestTimeout`) and nginx
(`client_header_timeout`, `client_body_timeout`, `worker_connections`) enforce:

- **headers**: from a connection's opening (or the first byte of its next request) to the
  end of the headers, at most `headers_timeout_s`; else 408 and the connection closes.
- **body**: from the end of the headers to the end of the body, at most `body_timeout_s`;
  else the connection closes and the request ends as a client disconnect (499).
- **connections**: past `max_connections` open at once, a new connection gets a 503 in
  OpenAI's error shape with `Retry-After` and is closed.

The time a response takes (a long stream) is not bounded here; the per-request time limit
(`limits.request_timeout_s`) does that. A request pipelined behind a response still being
sent gets no deadline (uvicorn reads nothing more until that response is done).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

OVER_CAPACITY_RETRY_AFTER_S = 1


def _raw_response(status: str, body: dict[str, object], extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + payload


OVER_CAPACITY = _raw_response(
    "503 Service Unavailable",
    {
        "error": {
            "message": "The server has too many open connections. Retry shortly.",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    },
    f"retry-after: {OVER_CAPACITY_RETRY_AFTER_S}\r\n",
)
HEADERS_TIMED_OUT = _raw_response(
    "408 Request Timeout",
    {
        "error": {
            "message": "The request's headers did not arrive in time.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    },
)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module's three limits (set on the subclass that
    `guarded_protocol` makes)."""

    headers_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 2048

    _deadline: asyncio.TimerHandle | None = None
    # What the connection is reading: "headers" (from its opening or a request's first byte),
    # "body", or "idle" (the last request was read whole).
    _phase = "headers"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(OVER_CAPACITY)
            transport.close()
            return
        self._arm(self.headers_timeout_s, self._headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        busy = self._busy()
        super().on_message_begin()
        if self._phase == "headers" and not busy:
            return  # the connection's first request: its deadline runs from the opening
        self._phase = "headers"
        self._deadline_for_phase(busy)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._deadline_for_phase(self._busy())
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "idle"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase != "idle" and not self.transport.is_closing():
            self._deadline_for_phase(busy=False)  # a pipelined request's turn: time it now

    def _deadline_for_phase(self, busy: bool) -> None:
        """Time what is being read, unless a response is still being sent on this connection:
        a request pipelined behind it waits its turn (uvicorn reads nothing more meanwhile),
        and a deadline now would cut the response in progress."""
        if busy:
            self._disarm()
        elif self._phase == "headers":
            self._arm(self.headers_timeout_s, self._headers_timed_out)
        elif self._phase == "body":
            self._arm(self.body_timeout_s, self._body_timed_out)

    def _busy(self) -> bool:
        """A response is still being sent on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self, seconds: float, expire: object) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expire)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # A request is not under way (its headers never ended), so the connection is ours.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(HEADERS_TIMED_OUT)
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app's `receive` then reports a disconnect


def guarded_protocol(
    headers_timeout_s: float, body_timeout_s: float, max_connections: int
) -> type[GuardedProtocol]:
    """A `GuardedProtocol` class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {
            "headers_timeout_s": headers_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
        },
    )
