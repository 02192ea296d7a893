"""The engine boundary: what the app needs from an inference engine, and the one hook through
which the gateway sees every engine request.

An `Engine` owns a vLLM `EngineClient` (`client`) and the argument namespace vLLM's own
`vllm serve` parser produced (`args`). vLLM's OpenAI serving layer runs on that client
(api/serving.py): sluice never builds sampling parameters or response bodies itself.
`VllmEngine` (engine/vllm.py) is a real `AsyncLLM` with its engine core in child processes;
`SyntheticEngine` (engine/synthetic.py) is the same `AsyncLLM` front end over a core that
makes filler tokens on a timer, for load tests and fast API tests.

The hook: while the gateway serves an HTTP request it sets `REQUEST_OBSERVER` to that
request's `RequestObserver`. Every engine request vLLM's serving layer starts in that
context (`generate` or `encode`) is reported to it when it is created (`submitted`, which
may lower `max_tokens` and returns the scheduling priority), waits for `before_engine`
(where the gateway reserves quota), is reported `accepted` once vLLM validated and queued it,
streams its outputs through `on_output`, and ends with `finished` (or `failed`). Nothing
here imports vLLM.
"""

from __future__ import annotations

from argparse import Namespace
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class EngineStats:
    """Live scheduler figures, for admission and readiness."""

    running: int
    waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class Submission:
    """One engine request as vLLM's serving layer created it.

    `prompt_tokens` is what the engine will see (after chat templates and truncation);
    `max_tokens` is per choice (0 for pooling requests), `n` the number of choices.
    """

    request_id: str
    prompt_tokens: int
    max_tokens: int
    n: int
    temperature: float | None = None
    top_p: float | None = None

    @property
    def max_total_tokens(self) -> int:
        """The most this submission can cost: its prompt once plus `max_tokens` per choice."""
        return self.prompt_tokens + self.max_tokens * self.n


class RequestObserver(Protocol):
    """The gateway's view of the engine requests of one HTTP request."""

    def submitted(self, submission: Submission, priority: int) -> tuple[int | None, int]:
        """A new engine request: returns `(max_tokens or None to keep it, priority)`.

        Called synchronously when vLLM creates the request, before any engine work. Raises
        to refuse it.
        """
        ...

    async def before_engine(self) -> None:
        """Awaited before the first submission reaches the engine (quota is reserved here);
        raising stops the request before the engine sees it."""
        ...

    def accepted(self, request_id: str) -> None:
        """vLLM validated the request and queued it in the engine."""
        ...

    def on_output(self, output: Any, new_tokens: int, queue_s: float | None) -> None:
        """vLLM's `output` arrived with `new_tokens` generated tokens; `queue_s` once the
        engine reports how long the request waited to be scheduled."""
        ...

    def failed(self, error: BaseException) -> None:
        """The engine request failed with `error` (vLLM's exception, or the observer's own
        from `before_engine`)."""
        ...

    def finished(self, request_id: str) -> None:
        """The engine request ended (every choice has a finish reason)."""
        ...


REQUEST_OBSERVER: ContextVar[RequestObserver | None] = ContextVar(
    "sluice_request_observer", default=None
)


@runtime_checkable
class Engine(Protocol):
    """What the app needs from an inference engine."""

    @property
    def ready(self) -> bool:
        """True once the model is loaded and `client` can take requests."""
        ...

    @property
    def client(self) -> Any:
        """The vLLM `EngineClient` (an `AsyncLLM`); only valid once `ready`."""
        ...

    @property
    def args(self) -> Namespace:
        """vLLM's `serve` argument namespace (engine and frontend options)."""
        ...

    @property
    def served_model_names(self) -> list[str]:
        """The ids clients use for the base model, first one canonical; known before start."""
        ...

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and release its processes and memory."""
        ...

    async def check_health(self) -> None:
        """Raise `EngineFailure` if the engine has failed."""
        ...

    def stats(self) -> EngineStats:
        """Current running and waiting sequences and KV-cache usage (0..1)."""
        ...


class EngineFailure(Exception):
    """Raised by engines when they can no longer serve (the process should restart)."""
