"""Running a job: engine deltas under a deadline, collected into a body or framed as SSE.

`job_deltas` is the one place that talks to `Engine.generate`; its `finally` aborts every
engine request of the job that has not finished, whatever ended it (success, error, time
limit, client disconnect, cancellation at shutdown). `sse_events` is the one generator that
owns SSE framing: once a stream has started, errors go inside it, and it always ends with
`data: [DONE]`. The caller (api/routes.py) counts the job in and out of the lifecycle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from opentelemetry import trace
from starlette.types import Receive

from sluice.api.formats import Choices, format_for
from sluice.api.plan import GenerationJob
from sluice.engine.protocol import Delta, Engine, EngineFailure, GenerationRequest
from sluice.errors import (
    EngineDead,
    RequestTimedOut,
    as_sluice_error,
    error_body,
    error_code,
    spec_for,
)
from sluice.lifecycle import Lifecycle
from sluice.telemetry.record import RequestRecord
from sluice.telemetry.tracing import GenerationSpan

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
TokenCallback = Callable[[int], None]
# Not a status a client ever reads (it has gone); it marks the request in logs and metrics.
CLIENT_CLOSED_REQUEST = 499


class JobRunner:
    """Runs jobs on one engine with one time limit, reporting engine death to the lifecycle."""

    def __init__(
        self,
        engine: Engine,
        lifecycle: Lifecycle,
        timeout_s: float,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.timeout_s = timeout_s
        self.tracer = tracer or trace.NoOpTracer()

    async def deltas(
        self,
        job: GenerationJob,
        record: RequestRecord | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Every delta of every choice of `job`, re-indexed to the client's choice index.

        `record` (if given) learns token arrival times and the engine's queue time;
        `on_tokens` hears every delta's token count (the gateway's meter).
        """
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        unfinished = {r.request_id for r in job.requests}
        bases = [0]
        for r in job.requests:
            bases.append(bases[-1] + r.sampling.n)
        streams = [
            _reindexed(self.engine.generate(r), base=base, request=r, unfinished=unfinished)
            for base, r in zip(bases, job.requests, strict=False)
        ]
        source = streams[0] if len(streams) == 1 else _merged(streams)
        span = _generation_span(self.tracer, job, record)
        output_tokens = 0
        finish_reasons: dict[int, str] = {}
        error: BaseException | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        delta = await anext(source)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimedOut(
                        f"The request ran past this server's time limit of "
                        f"{self.timeout_s:g} seconds and was stopped.",
                    ) from None
                except EngineFailure as exc:
                    self.lifecycle.fail(str(exc) or type(exc).__name__)
                    raise EngineDead(
                        "The inference engine failed while generating; the server is "
                        "restarting. Retry shortly.",
                        retry_after_s=10,
                    ) from exc
                span.on_delta()
                output_tokens += delta.token_count
                if on_tokens is not None:
                    on_tokens(delta.token_count)
                if delta.finish_reason is not None:
                    finish_reasons[delta.index] = delta.finish_reason
                if record is not None:
                    record.on_tokens(time.perf_counter(), delta.token_count)
                    if record.output_text is not None:
                        record.output_text.append(delta.text)
                    if delta.queue_s is not None and record.queue_s is None:
                        record.queue_s = delta.queue_s
                yield delta
        except BaseException as exc:
            error = exc
            raise
        finally:
            span.finish(
                response_id=job.response_id,
                input_tokens=job.prompt_tokens,
                output_tokens=output_tokens,
                finish_reasons=[finish_reasons[i] for i in sorted(finish_reasons)],
                error=error,
            )
            with anyio.CancelScope(shield=True):
                await source.aclose()
                for request_id in unfinished:
                    try:
                        await self.engine.abort(request_id)
                    except Exception:  # an abort that fails must not hide the real error
                        logger.warning("abort of %s failed", request_id, exc_info=True)

    async def collect(
        self,
        job: GenerationJob,
        record: RequestRecord | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> dict[str, Any]:
        """The whole non-streaming response body."""
        fmt = format_for(job)
        choices = Choices(job)
        async for delta in self.deltas(job, record, on_tokens):
            choices.add(delta)
        return fmt.final(choices)

    async def sse_events(
        self,
        job: GenerationJob,
        record: RequestRecord | None = None,
        on_tokens: TokenCallback | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """SSE frames of a streamed response, ending with `data: [DONE]` whatever happens."""
        fmt = format_for(job)
        choices = Choices(job)
        completed = False
        try:
            try:
                async for delta in self.deltas(job, record, on_tokens):
                    state = choices.add(delta)
                    yield _frame(fmt.chunk(delta, state))
                if job.include_usage:
                    yield _frame(fmt.usage_chunk(choices))
            except Exception as exc:
                error = as_sluice_error(exc)
                if record is not None:
                    record.fail(spec_for(error).status, error_code(error))
                yield _frame(error_body(error))
            completed = True
            yield DONE
        finally:
            if not completed and record is not None and record.status is None:
                record.fail(CLIENT_CLOSED_REQUEST, "client_closed_request")


def _generation_span(
    tracer: trace.Tracer, job: GenerationJob, record: RequestRecord | None
) -> GenerationSpan:
    sampling = job.requests[0].sampling
    operation = "chat" if job.kind == "chat" else "text_completion"
    return GenerationSpan(
        tracer,
        record.trace_context if record is not None else None,
        {
            "gen_ai.operation.name": operation,
            "gen_ai.system": "vllm",
            "gen_ai.request.model": job.model,
            "gen_ai.request.max_tokens": max(r.sampling.max_tokens for r in job.requests),
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
        },
        operation,
        job.model,
    )


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _reindexed(
    stream: AsyncGenerator[Delta, None],
    *,
    base: int,
    request: GenerationRequest,
    unfinished: set[str],
) -> AsyncGenerator[Delta, None]:
    """Shift choice indexes by `base`; forget the request once all its choices finished."""
    remaining = request.sampling.n
    async for delta in stream:
        if delta.finish_reason is not None:
            remaining -= 1
            if remaining == 0:
                unfinished.discard(request.request_id)
        yield dataclasses.replace(delta, index=base + delta.index) if base else delta


async def _merged(streams: list[AsyncGenerator[Delta, None]]) -> AsyncGenerator[Delta, None]:
    """Interleave several delta streams as their items arrive."""
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Delta, None]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(receive: Receive) -> None:
    """Return when the client has gone away (the request body was already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
