"""HTTP plumbing for generation: SSE responses and cancel-on-disconnect for plain responses.

Both guarantee that a client who goes away cancels the work (which aborts the engine request,
also while it is still queued) and that `on_close` runs exactly once, whatever happens
(it releases the lifecycle slot and settles the gateway's reservation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sluice.api.run import until_disconnected

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SSEResponse(StreamingResponse):
    """`text/event-stream` whose generator is always closed and whose `on_close` always runs.

    Starlette cancels the stream when the client disconnects (it listens for
    `http.disconnect` beside the stream); closing the generator here runs its `finally`,
    which aborts the engine request.
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._on_close()


async def cancel_on_disconnect(
    request: Request, work: Coroutine[Any, Any, T]
) -> tuple[bool, T | None]:
    """Run `work` until it ends or the client disconnects: `(finished, result)`."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work_task
    if work_task.cancelled():
        return False, None
    return True, work_task.result()
