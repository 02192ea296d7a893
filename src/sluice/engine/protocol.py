"""The narrow engine boundary: the Protocol routes depend on and the frozen types crossing it.

Nothing here imports vLLM. `VllmEngine` (engine/vllm.py) implements this over `AsyncLLM`;
tests implement it with a fake. An engine takes token ids, never raw HTTP bodies, so the
gateway tokenises once and counts exactly what the engine will see.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ModelCard:
    """What the gateway needs to know about the loaded model."""

    id: str
    max_model_len: int
    created: int
    owned_by: str = "sluice"


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain output to JSON: any object (`schema is None`) or one JSON schema."""

    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings, already validated and defaulted by the API layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top alternatives per token; None = off
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate `sampling.n` completions for."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions
    priority: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token, its log-probability and the top alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of one choice: text, how many tokens it holds, and maybe the end."""

    index: int
    text: str
    token_count: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = field(default=())
    queue_s: float | None = None  # time the request waited in the engine's queue, once known


@dataclass(frozen=True)
class EngineStats:
    """Live scheduler figures, for admission and readiness."""

    running: int
    waiting: int
    kv_cache_usage: float


@runtime_checkable
class Engine(Protocol):
    """What the gateway needs from an inference engine."""

    @property
    def ready(self) -> bool:
        """True once the model is loaded and the engine can take requests."""
        ...

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and release its processes and memory."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine has failed."""
        ...

    def model_card(self) -> ModelCard:
        """The loaded model's id and context length."""
        ...

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a rendered chat template already holds its special tokens."""
        ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's chat template applied to `messages`, with the generation prompt."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Stream deltas of all `n` choices, interleaved, until each has a finish reason."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; a no-op for unknown ids."""
        ...

    def stats(self) -> EngineStats:
        """Current running and waiting sequences and KV-cache usage (0..1)."""
        ...


class EngineFailure(Exception):
    """Raised by engines when they can no longer serve (the process should restart)."""
