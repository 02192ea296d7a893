"""`Exchange`: the one owner of a generating request's life, from admission to settlement.

Every endpoint that makes the engine work (chat, completions, responses, embeddings) opens
one per HTTP request, streaming or not. It holds:

- the lifecycle slot (`open` refuses while loading, draining or dead; `close` gives it back),
- the admission decision (shed before any tokenising; the gate's `max_tokens` clamp),
- the gateway's reservation: as vLLM's serving layer creates engine requests the exchange
  hears of them (it is their `RequestObserver`, engine/protocol.py), lowers `max_tokens` to
  the server's and the key's caps, and before the first one reaches the engine reserves
  their exact prompt tokens plus `max_tokens * n` (429 here stops the request),
- the meter: tokens as they arrive go to the gateway (admission's queue and gate), the
  request's record (first-token time, gaps, queue time) and the GenAI span,
- the ending: `close` runs once, whatever ended the request (success, error, time limit,
  disconnect, drain cut-off), shielded from cancellation. It aborts engine requests that are
  still running, settles every reservation from what was used (prompt tokens only for engine
  requests vLLM accepted, plus the tokens generated), releases the slot and ends the span.

`error` is the reason the exchange stopped the request (quota, engine death), which wins over
the way vLLM's serving layer reports the exception it saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import anyio
from opentelemetry import trace

from sluice.config import LimitSettings
from sluice.engine.protocol import Submission
from sluice.errors import (
    CLIENT_PARAMS,
    ContextLengthExceeded,
    EngineDead,
    RequestTimedOut,
    SluiceError,
    request_timed_out,
)
from sluice.gateway.auth import Principal
from sluice.gateway.service import Gateway, Ticket
from sluice.lifecycle import Lifecycle
from sluice.telemetry.record import RequestRecord
from sluice.telemetry.tracing import GenerationSpan

logger = logging.getLogger(__name__)


class Exchange:
    """One generating request's slot, reservations, meter and ending (module docstring)."""

    def __init__(
        self,
        *,
        principal: Principal,
        gateway: Gateway,
        lifecycle: Lifecycle,
        limits: LimitSettings,
        clamp: int | None,
        model: str,
        operation: str,
        engine_client: Any,
        requested_max_tokens: int | None = None,
        record: RequestRecord | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.principal = principal
        self.requested_max_tokens = requested_max_tokens
        self.gateway = gateway
        self.lifecycle = lifecycle
        self.model = model
        self.operation = operation
        self.record = record
        self.error: SluiceError | None = None
        self.acceptance = asyncio.Event()
        self.timeout_s = limits.request_timeout_s
        self.deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        self.tickets: list[tuple[Ticket, list[Submission]]] = []
        self._engine_client = engine_client
        self._tracer = tracer or trace.NoOpTracer()
        self._max_tokens = min(
            cap for cap in (limits.max_tokens_cap, _key_cap(principal), clamp) if cap is not None
        )
        self._submissions: dict[str, Submission] = {}
        self._unreserved: list[Submission] = []
        self._accepted: set[str] = set()
        self._finished: set[str] = set()
        self._finish_reasons: list[str] = []
        self._output_tokens = 0
        self._reserve_lock = asyncio.Lock()
        self._span: GenerationSpan | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        *,
        principal: Principal,
        gateway: Gateway,
        lifecycle: Lifecycle,
        limits: LimitSettings,
        model: str,
        operation: str,
        engine_client: Any,
        requested_max_tokens: int | None = None,
        record: RequestRecord | None = None,
        tracer: trace.Tracer | None = None,
    ) -> Exchange:
        """Take a lifecycle slot and pass admission (503 when loading, draining, dead or
        overloaded), before any tokenising."""
        lifecycle.admit()
        try:
            clamp = gateway.admit(principal)
        except BaseException:
            lifecycle.release()
            raise
        return cls(
            principal=principal,
            gateway=gateway,
            lifecycle=lifecycle,
            limits=limits,
            clamp=clamp,
            model=model,
            operation=operation,
            engine_client=engine_client,
            requested_max_tokens=requested_max_tokens,
            record=record,
            tracer=tracer,
        )

    def timed_out(self) -> RequestTimedOut:
        """The error for a request that ran past the time limit."""
        return request_timed_out(self.timeout_s)

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers of the first reservation (none before it, or when open)."""
        return self.tickets[0][0].headers if self.tickets else {}

    # -- RequestObserver --------------------------------------------------------------------
    def submitted(self, submission: Submission, priority: int) -> tuple[int | None, int]:
        requested = self.requested_max_tokens
        context = int(self._engine_client.model_config.max_model_len)
        if requested is not None and submission.prompt_tokens + requested > context:
            # vLLM quietly lowers max_tokens to what fits; OpenAI refuses the request.
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {submission.prompt_tokens + requested} tokens "
                f"({submission.prompt_tokens} in the prompt, {requested} in the completion). "
                "Please reduce the length of the prompt or the completion.",
                param=(CLIENT_PARAMS.get() or {}).get("max_tokens", "max_tokens"),
            )
        max_tokens = min(submission.max_tokens, self._max_tokens)
        submission = dataclasses.replace(submission, max_tokens=max_tokens)
        self._submissions[submission.request_id] = submission
        self._unreserved.append(submission)
        self.acceptance.clear()
        # A request may lower its own scheduling priority, never raise it over its key's.
        return max_tokens, max(priority, self.principal.engine_priority)

    async def before_engine(self) -> None:
        async with self._reserve_lock:
            if self.error is None and self._unreserved:
                batch, self._unreserved = self._unreserved, []
                try:
                    ticket = await self.gateway.reserve(
                        self.principal,
                        self.model,
                        sum(s.prompt_tokens for s in batch),
                        sum(s.max_tokens * s.n for s in batch),
                    )
                except SluiceError as exc:
                    self.error = exc
                else:
                    self.tickets.append((ticket, batch))
                    self._start_span(batch)
        if self.error is not None:
            raise self.error

    def accepted(self, request_id: str) -> None:
        if request_id in self._accepted:
            return
        self._accepted.add(request_id)
        if self.record is not None:
            self.record.prompt_tokens += self._submissions[request_id].prompt_tokens
        if len(self._accepted) == len(self._submissions):
            self.acceptance.set()

    def on_output(self, output: Any, new_tokens: int, queue_s: float | None) -> None:
        # Runs for every streamed output: keep it to counters and one clock read.
        record = self.record
        if new_tokens:
            self._output_tokens += new_tokens
            self.gateway.on_tokens(self.tickets[-1][0], new_tokens)
            if self._span is not None:
                self._span.on_delta()
            if record is not None:
                record.on_tokens(time.perf_counter(), new_tokens)
        choices = getattr(output, "outputs", None)
        if not isinstance(choices, list):  # a pooling output: one vector, no choices
            return
        if output.finished:
            self._finish_reasons.extend(str(c.finish_reason) for c in choices if c.finish_reason)
        if record is None:
            return
        if queue_s is not None and record.queue_s is None:
            record.queue_s = queue_s
        if record.output_text is not None:
            record.output_text.extend(c.text for c in choices)

    def failed(self, error: BaseException) -> None:
        if self.error is None and type(error).__name__ == "EngineDeadError":
            self.error = EngineDead(
                "The inference engine failed while generating; the server is restarting. "
                "Retry shortly.",
                retry_after_s=10,
            )
            self.lifecycle.fail(f"engine died: {error}")

    def finished(self, request_id: str) -> None:
        self._finished.add(request_id)

    # -- the ending ---------------------------------------------------------------------------
    async def close(self, error: BaseException | None = None) -> None:
        """Abort what still runs, settle, release; once, shielded from cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            # The shield holds off the server's own cancel scopes, not a cancellation of
            # the request's task (uvicorn's cut-off after a drain): then what is left to
            # settle goes to the gateway's backlog and the slot is still released.
            try:
                running = [rid for rid in self._accepted if rid not in self._finished]
                if running:
                    try:
                        await self._engine_client.abort(running)
                    except Exception:  # an abort that fails must not hide the outcome
                        logger.warning("abort of %s failed", running, exc_info=True)
                for ticket, batch in self.tickets:
                    await self.gateway.settle(ticket, self._accepted_prompt(batch))
            except asyncio.CancelledError:
                for ticket, batch in self.tickets:
                    self.gateway.settle_later(ticket, self._accepted_prompt(batch))
                raise
            finally:
                self.lifecycle.release()
                self._finish_span(error)

    def _accepted_prompt(self, batch: list[Submission]) -> int:
        return sum(s.prompt_tokens for s in batch if s.request_id in self._accepted)

    def _finish_span(self, error: BaseException | None) -> None:
        if self._span is not None:
            self._span.finish(
                response_id=next(iter(self._submissions), ""),
                input_tokens=sum(
                    s.prompt_tokens
                    for s in self._submissions.values()
                    if s.request_id in self._accepted
                ),
                output_tokens=self._output_tokens,
                finish_reasons=self._finish_reasons,
                error=error or self.error,
            )

    def _start_span(self, batch: list[Submission]) -> None:
        if self._span is not None:
            return
        first = batch[0]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.system": "vllm",
            "gen_ai.request.model": self.model,
            "gen_ai.request.max_tokens": max(s.max_tokens for s in batch),
        }
        if first.temperature is not None:
            attributes["gen_ai.request.temperature"] = first.temperature
        if first.top_p is not None:
            attributes["gen_ai.request.top_p"] = first.top_p
        self._span = GenerationSpan(
            self._tracer,
            self.record.trace_context if self.record is not None else None,
            attributes,
            self.operation,
            self.model,
        )


def _key_cap(principal: Principal) -> int | None:
    policy = principal.policy
    return policy.max_tokens if policy is not None else None
