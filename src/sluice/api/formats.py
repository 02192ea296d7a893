"""Response shapes: OpenAI's completion and chat objects, whole and as stream chunks.

`Choices` accumulates the deltas of every choice of a job; `CompletionFormat` and
`ChatFormat` turn deltas into chunks and the accumulated state into a final body. They are
plain dicts because this is the hot path of every streamed token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sluice import __version__
from sluice.api.plan import GenerationJob
from sluice.engine.protocol import Delta, TokenLogprob

# Identifies the serving stack that produced an answer, as OpenAI's field does.
SYSTEM_FINGERPRINT = f"sluice-{__version__}"


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    started: bool = False


class Choices:
    """Per-choice state of a job, indexed by the choice index clients see."""

    def __init__(self, job: GenerationJob) -> None:
        self.job = job
        self.states = [ChoiceState() for _ in range(job.choice_count)]

    def add(self, delta: Delta) -> ChoiceState:
        state = self.states[delta.index]
        state.text.append(delta.text)
        state.tokens += delta.token_count
        state.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            state.finish_reason = delta.finish_reason
        return state

    @property
    def completion_tokens(self) -> int:
        return sum(state.tokens for state in self.states)

    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens
        return {
            "prompt_tokens": self.job.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.job.prompt_tokens + completion,
        }

    def finish_reasons(self) -> list[str]:
        return [state.finish_reason or "stop" for state in self.states]


class ResponseFormat(Protocol):
    def chunk(self, delta: Delta, state: ChoiceState) -> dict[str, Any]: ...
    def final(self, choices: Choices) -> dict[str, Any]: ...
    def usage_chunk(self, choices: Choices) -> dict[str, Any]: ...


def _envelope(job: GenerationJob, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": job.response_id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [dict(item.top) for item in items],
        "text_offset": offsets,
    }


def _chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": item.token,
                "logprob": item.logprob,
                "bytes": list(item.token.encode()),
                "top_logprobs": [
                    {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
                    for tok, lp in item.top
                ],
            }
            for item in items
        ],
        "refusal": None,
    }


class CompletionFormat:
    """`text_completion` objects."""

    def __init__(self, job: GenerationJob) -> None:
        self.job = job

    def _echo(self, index: int) -> str:
        if self.job.echo_texts is None:
            return ""
        return self.job.echo_texts[index // self.job.n]

    def chunk(self, delta: Delta, state: ChoiceState) -> dict[str, Any]:
        text = delta.text
        if not state.started:
            state.started = True
            text = self._echo(delta.index) + text
        logprobs = None
        if self.job.logprobs:
            done = len(self._echo(delta.index)) + sum(len(t) for t in state.text) - len(delta.text)
            logprobs = _completion_logprobs(list(delta.logprobs), done)
        choice = {
            "index": delta.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        body = _envelope(self.job, "text_completion", [choice])
        if self.job.include_usage:
            body["usage"] = None
        return body

    def final(self, choices: Choices) -> dict[str, Any]:
        out = []
        for index, state in enumerate(choices.states):
            echo = self._echo(index)
            out.append(
                {
                    "index": index,
                    "text": echo + "".join(state.text),
                    "logprobs": (
                        _completion_logprobs(state.logprobs, len(echo))
                        if self.job.logprobs
                        else None
                    ),
                    "finish_reason": state.finish_reason or "stop",
                }
            )
        body = _envelope(self.job, "text_completion", out)
        body["usage"] = choices.usage()
        return body

    def usage_chunk(self, choices: Choices) -> dict[str, Any]:
        body = _envelope(self.job, "text_completion", [])
        body["usage"] = choices.usage()
        return body


class ChatFormat:
    """`chat.completion` and `chat.completion.chunk` objects."""

    def __init__(self, job: GenerationJob) -> None:
        self.job = job

    def chunk(self, delta: Delta, state: ChoiceState) -> dict[str, Any]:
        message: dict[str, Any] = {"content": delta.text}
        if not state.started:
            state.started = True
            message = {"role": "assistant", "content": delta.text}
        choice = {
            "index": delta.index,
            "delta": message,
            "logprobs": _chat_logprobs(delta.logprobs) if self.job.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        body = _envelope(self.job, "chat.completion.chunk", [choice])
        body["system_fingerprint"] = SYSTEM_FINGERPRINT
        if self.job.include_usage:
            body["usage"] = None
        return body

    def final(self, choices: Choices) -> dict[str, Any]:
        out = [
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": "".join(state.text),
                    "refusal": None,
                },
                "logprobs": _chat_logprobs(state.logprobs) if self.job.logprobs else None,
                "finish_reason": state.finish_reason or "stop",
            }
            for index, state in enumerate(choices.states)
        ]
        body = _envelope(self.job, "chat.completion", out)
        body["system_fingerprint"] = SYSTEM_FINGERPRINT
        body["usage"] = choices.usage()
        return body

    def usage_chunk(self, choices: Choices) -> dict[str, Any]:
        body = _envelope(self.job, "chat.completion.chunk", [])
        body["system_fingerprint"] = SYSTEM_FINGERPRINT
        body["usage"] = choices.usage()
        return body


def format_for(job: GenerationJob) -> ResponseFormat:
    return ChatFormat(job) if job.kind == "chat" else CompletionFormat(job)
