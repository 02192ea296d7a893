"""`RequestRecord`: what one HTTP request did, filled in along the request path.

The observability middleware creates one per request and puts it in the ASGI scope; routes
and the job runner add what they learn (model, tokens, first-token and token times, the
outcome of a stream); when the response is done the middleware turns it into metrics and one
log line. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

SCOPE_KEY = "sluice.record"


@dataclass
class RequestRecord:
    """One request's facts; fields stay `None` where they do not apply."""

    request_id: str
    endpoint: str
    started: float
    model: str | None = None
    key_name: str | None = None
    status: int | None = None  # the outcome; for a stream that failed, the error's status
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_s: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    prompt_text: str | None = None  # only with telemetry.log_prompts
    output_text: list[str] | None = None  # only with telemetry.log_prompts
    trace_id: str | None = None
    trace_context: Any = None  # the OpenTelemetry context of the server span
    cost_usd: float | None = None  # of the tokens served, from the price table (metrics)
    backend: str | None = None  # the upstream that answered (None: the engine, or nobody)
    attempt: int | None = None  # the attempt that answered (1: the first)
    price: Any = None  # the answering backend's ModelPrice, where it is not the table's

    def on_tokens(self, now: float, count: int) -> None:
        """`count` new tokens arrived at `now`; gaps between arrivals are spread per token."""
        if count <= 0:
            return
        self.completion_tokens += count
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.last_token_at is not None:
            gap = (now - self.last_token_at) / count
            self.token_gaps.extend([gap] * count)
        self.last_token_at = now

    def fail(self, status: int, code: str | None) -> None:
        self.status = status
        self.error_code = code

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started


def record_of(scope: Scope) -> RequestRecord | None:
    """The record the middleware attached to this request, if any."""
    record: RequestRecord | None = scope.get("state", {}).get(SCOPE_KEY)
    return record
