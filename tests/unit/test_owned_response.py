"""`OwnedResponse`: a whole body is sent first, then its owner closes (settles) once, also
when sending fails."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message

from sluice.api.sse import OwnedResponse


class Owner:
    """What the response closes; records the order of events."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.record = None
        self.error = None
        self.acceptance = asyncio.Event()
        self.deadline = 0.0

    @property
    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-remaining-requests": "9"}

    def timed_out(self) -> Any:
        raise AssertionError("not used")

    async def close(self, error: BaseException | None = None) -> None:
        self.events.append(("close", error))


SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_the_body_is_sent_before_the_owner_closes() -> None:
    events: list[Any] = []

    async def send(message: Message) -> None:
        events.append(message["type"])
        if message["type"] == "http.response.start":
            assert (b"x-ratelimit-remaining-requests", b"9") in message["headers"]
        else:
            assert message["body"] == b'{"id":"x"}'

    asyncio.run(OwnedResponse(b'{"id":"x"}', Owner(events))(SCOPE, receive, send))
    assert events == ["http.response.start", "http.response.body", ("close", None)]


def test_a_send_that_fails_still_closes_the_owner_with_its_error() -> None:
    events: list[Any] = []
    broken = ConnectionResetError("gone")

    async def send(message: Message) -> None:
        raise broken

    with pytest.raises(ConnectionResetError):
        asyncio.run(OwnedResponse(b"{}", Owner(events))(SCOPE, receive, send))
    assert events == [("close", broken)]


def test_a_response_read_instead_of_sent_closes_its_owner_once_asked() -> None:
    events: list[Any] = []
    response = OwnedResponse(b'{"id":"x"}', Owner(events))
    assert bytes(response.body) == b'{"id":"x"}'
    asyncio.run(response.close_owner())
    assert events == [("close", None)]
