"""Planning: turn a validated OpenAI body into a `GenerationJob` the engine can run.

This is where prompts are rendered (chat template) and tokenised once, `max_tokens` is
resolved against the context window, and sampling fields get their OpenAI defaults. Nothing
here touches the engine's scheduler: a job that fails planning costs no engine work.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from sluice.api.schemas import ChatCompletionRequest, CompletionRequest
from sluice.config import Settings
from sluice.engine.protocol import (
    Engine,
    GenerationRequest,
    SamplingOptions,
    StructuredOutput,
)
from sluice.gateway.guards import (
    NO_CAPS,
    Caps,
    check_allowed,
    check_model,
    check_n,
    resolve_max_tokens,
)

JobKind = Literal["text_completion", "chat"]

# OpenAI's documented default for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class GenerationJob:
    """Everything needed to run a request and shape its response."""

    kind: JobKind
    response_id: str
    created: int
    model: str
    requests: tuple[GenerationRequest, ...]
    n: int
    prompt_tokens: int
    stream: bool
    include_usage: bool
    echo_texts: tuple[str, ...] | None  # per prompt; completions with echo=true only
    logprobs: bool

    @property
    def choice_count(self) -> int:
        return sum(r.sampling.n for r in self.requests)

    @property
    def max_output_tokens(self) -> int:
        """The most this job can generate: `max_tokens * n` over its prompts."""
        return sum(r.sampling.max_tokens * r.sampling.n for r in self.requests)


def _sampling(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    structured: StructuredOutput | None,
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=body.n,
        stop=body.stop_sequences(),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=logprobs,
        structured=structured,
    )


def _fan_out(
    request_id: str, ids: list[int], sampling: SamplingOptions, priority: int
) -> tuple[GenerationRequest, ...]:
    """One engine request for the `n` choices of a prompt, or `n` when sampling is greedy.

    vLLM refuses `n > 1` with temperature 0, which OpenAI accepts (the choices are equal);
    separate greedy requests give the same answer and share the prompt's cached blocks.
    """
    if sampling.n == 1 or sampling.temperature > 0:
        return (GenerationRequest(request_id, tuple(ids), sampling, priority),)
    single = dataclasses.replace(sampling, n=1)
    return tuple(
        GenerationRequest(f"{request_id}-{j}", tuple(ids), single, priority)
        for j in range(sampling.n)
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def plan_completion(
    body: CompletionRequest, engine: Engine, settings: Settings, caps: Caps = NO_CAPS
) -> GenerationJob:
    """Plan `POST /v1/completions`: one engine request per prompt, `n` choices each."""
    card = engine.model_card()
    check_model(body.model, card)
    check_allowed(card.id, caps.principal)
    prompts = body.prompts()
    check_n(body.n, len(prompts), settings.limits)
    token_lists = [engine.tokenize(text) for text in prompts]
    budgets = [
        resolve_max_tokens(
            prompt_tokens=len(ids),
            requested=body.max_tokens,
            default=COMPLETIONS_DEFAULT_MAX_TOKENS,
            card=card,
            limits=settings.limits,
            prompt_param="prompt",
            caps=caps,
        )
        for ids in token_lists
    ]
    response_id = _new_id("cmpl")
    requests = tuple(
        request
        for i, (ids, budget) in enumerate(zip(token_lists, budgets, strict=True))
        for request in _fan_out(
            f"{response_id}-{i}",
            ids,
            _sampling(body, budget, body.logprobs, None),
            caps.principal.engine_priority,
        )
    )
    return GenerationJob(
        kind="text_completion",
        response_id=response_id,
        created=int(time.time()),
        model=card.id,
        requests=requests,
        n=body.n,
        prompt_tokens=sum(len(ids) for ids in token_lists),
        stream=body.stream,
        include_usage=body.include_usage,
        echo_texts=tuple(prompts) if body.echo else None,
        logprobs=body.logprobs is not None,
    )


def _structured(body: ChatCompletionRequest) -> StructuredOutput | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(json_schema=None)
    assert fmt.json_schema is not None  # enforced by ResponseFormat's validator
    return StructuredOutput(json_schema=fmt.json_schema.schema_ or {"type": "object"})


def plan_chat(
    body: ChatCompletionRequest, engine: Engine, settings: Settings, caps: Caps = NO_CAPS
) -> GenerationJob:
    """Plan `POST /v1/chat/completions`: render the model's chat template, tokenise once."""
    card = engine.model_card()
    check_model(body.model, card)
    check_allowed(card.id, caps.principal)
    check_n(body.n, 1, settings.limits)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    ids = engine.tokenize(engine.render_chat(messages), add_special_tokens=False)
    budget = resolve_max_tokens(
        prompt_tokens=len(ids),
        requested=body.requested_max_tokens,
        default=None,
        card=card,
        limits=settings.limits,
        prompt_param="messages",
        max_tokens_param=(
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        ),
        caps=caps,
    )
    top = (body.top_logprobs or 0) if body.logprobs else None
    response_id = _new_id("chatcmpl")
    requests = _fan_out(
        response_id,
        ids,
        _sampling(body, budget, top, _structured(body)),
        caps.principal.engine_priority,
    )
    return GenerationJob(
        kind="chat",
        response_id=response_id,
        created=int(time.time()),
        model=card.id,
        requests=requests,
        n=body.n,
        prompt_tokens=len(ids),
        stream=body.stream,
        include_usage=body.include_usage,
        echo_texts=None,
        logprobs=body.logprobs,
    )
