"""Request bodies: vLLM's own request models, with what an OpenAI-compatible gateway adds.

Each route parses its body with vLLM's pydantic model (every vLLM field, vLLM's own
validation), through the subclasses here where sluice differs:

- `n > 1` with greedy sampling is accepted, as OpenAI does; vLLM refuses it, so
  `to_sampling_params` builds the params for one choice and sets `n` afterwards, which
  `ObservedAsyncLLM` runs as `n` single greedy requests (engine/observed.py).
- Fields that OpenAI's API description marks nullable accept `null` (clients that serialise
  unset fields as null); vLLM declares a few of them non-nullable.

The routes take each model behind `_guard` (the `*Body` aliases), so that nothing a body
makes vLLM's validators raise can be a 500.

`check_fields` refuses what vLLM would ignore without a word: a top-level field no model
declares is a 400 naming it (OpenAI's own wording), except OpenAI's fields that do not change
the answer (`metadata`, `store: false`, ...), which are accepted, and those that would change it
(`audio`, `web_search_options`, ...), which are refused unless unset. Beam search is refused:
the gateway cannot price it before it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest as VllmCompletionRequest,
)
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.exceptions import VLLMError

from sluice.errors import InvalidRequest

GREEDY_TEMPERATURE = 1e-5


def _greedy_fan_out(
    request: VllmChatCompletionRequest | VllmCompletionRequest,
    build: Callable[[Any], Any],
) -> Any:
    """`build(request)`, except that `n > 1` with greedy sampling gets params for one choice
    with `n` set afterwards (vLLM's constructor refuses the combination)."""
    n = request.n or 1
    if n <= 1:  # vLLM's own check refuses n < 1
        return build(request)
    params = build(request.model_copy(update={"n": 1}))
    if params.temperature >= GREEDY_TEMPERATURE:
        return build(request)
    params.n = n
    return params


class ChatCompletionRequest(VllmChatCompletionRequest):  # type: ignore[misc]
    """`POST /v1/chat/completions`: vLLM's model (see module docstring for the changes)."""

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict[str, Any]) -> Any:
        return _greedy_fan_out(
            self,
            lambda request: VllmChatCompletionRequest.to_sampling_params(
                request, max_tokens, default_sampling_params
            ),
        )


class CompletionRequest(VllmCompletionRequest):  # type: ignore[misc]
    """`POST /v1/completions`: vLLM's model with `n` nullable (OpenAI: `n` is nullable)."""

    n: int | None = 1

    @model_validator(mode="before")
    @classmethod
    def validate_prompt_and_prompt_embeds(cls, data: Any) -> Any:
        """vLLM's check, except that `"prompt": null` is allowed: OpenAI reads it as "from
        the start of a new document" (the route gives the model's start token)."""
        explicit_null = isinstance(data, dict) and "prompt" in data and data["prompt"] is None
        if explicit_null and data.get("prompt_embeds") is None:
            return data
        parent: Any = VllmCompletionRequest
        return parent.validate_prompt_and_prompt_embeds(data)

    @field_validator("n", mode="after")
    @classmethod
    def _default_n(cls, value: int | None) -> int:
        return 1 if value is None else value

    def to_sampling_params(
        self, max_tokens: int, default_sampling_params: dict[str, Any] | None = None
    ) -> Any:
        return _greedy_fan_out(
            self,
            lambda request: VllmCompletionRequest.to_sampling_params(
                request, max_tokens, default_sampling_params
            ),
        )


# Responses fields OpenAI's API description marks nullable that vLLM cannot take as null:
# its request model refuses `service_tier: null`; its response model refuses `background`
# and `truncation` null (after the engine ran). A null reads as the field left out.
RESPONSES_NULL_IS_DEFAULT = ("background", "service_tier", "truncation")


class ResponsesRequest(VllmResponsesRequest):  # type: ignore[misc]
    """`POST /v1/responses`: vLLM's model; `null` in `RESPONSES_NULL_IS_DEFAULT` is the
    field's default (OpenAI: `background`, `service_tier` and `truncation` are nullable)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            data.get(name, False) is None for name in RESPONSES_NULL_IS_DEFAULT
        ):
            return {
                k: v for k, v in data.items() if not (k in RESPONSES_NULL_IS_DEFAULT and v is None)
            }
        return data


def _guard(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validation is a function of the body alone, so whatever it raises is the body's
    fault: vLLM's own validators assume shapes (`structured_outputs.get(...)` on a `false`)
    and would otherwise turn a malformed body into a 500."""
    try:
        return handler(value)
    except (ValidationError, VLLMError):
        raise
    except Exception as exc:
        raise ValueError(f"the request body is malformed ({type(exc).__name__}: {exc})") from exc


# The body types of the routes: each request model behind the guard.
ChatBody = Annotated[ChatCompletionRequest, WrapValidator(_guard)]
CompletionBody = Annotated[CompletionRequest, WrapValidator(_guard)]
ResponsesBody = Annotated[ResponsesRequest, WrapValidator(_guard)]
EmbeddingBody = Annotated[EmbeddingRequest, WrapValidator(_guard)]
TokenizeBody = Annotated[TokenizeRequest, WrapValidator(_guard)]
DetokenizeBody = Annotated[DetokenizeRequest, WrapValidator(_guard)]


def _unset(value: Any) -> bool:
    return value is None


def _is(*allowed: Any) -> Callable[[Any], bool]:
    """None or one of `allowed`, compared with its type (`0` is not `False`)."""
    return lambda value: (
        value is None or any(type(value) is type(option) and value == option for option in allowed)
    )


def _string(max_length: int | None = None) -> Callable[[Any], bool]:
    return lambda value: (
        value is None
        or (isinstance(value, str) and (max_length is None or len(value) <= max_length))
    )


def _object(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _metadata(value: Any) -> bool:
    """OpenAI's `Metadata`: up to 16 pairs, string keys of at most 64 characters, string
    values of at most 512."""
    return value is None or (
        isinstance(value, dict)
        and len(value) <= 16
        and all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items())
    )


def _prediction(value: Any) -> bool:
    """OpenAI's `PredictionContent`: `{"type": "content", "content": text or parts}`."""
    return value is None or (
        isinstance(value, dict)
        and value.get("type") == "content"
        and isinstance(value.get("content"), str | list)
    )


def _boolean(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _integer(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _strings(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# OpenAI fields vLLM's models do not declare, with the type OpenAI's API description gives
# each (a value of another type is a 400 `invalid_type`). Source:
# ../shared/openai-openapi/openapi.yaml (CreateChatCompletionRequest, CreateCompletionRequest,
# CreateResponse) against vLLM 0.32's models.
OPENAI_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "metadata": (
        _metadata,
        "an object of up to 16 string keys (64 characters each) with "
        "string values (512 characters each)",
    ),
    "safety_identifier": (_string(64), "a string of at most 64 characters"),
    "prompt_cache_key": (_string(), "a string"),
    "prompt_cache_retention": (_string(), "a string"),
    "prompt_cache_options": (_object, "an object"),
    "prediction": (_prediction, "an object {'type': 'content', 'content': text or parts}"),
    "stream_options": (_object, "an object"),
    "service_tier": (_string(), "a string"),
    "store": (_boolean, "a boolean"),
    "modalities": (_strings, "an array of strings"),
    "verbosity": (_string(), "a string"),
    "best_of": (_integer, "an integer"),
}

# Of those, which values this server serves (else a 400 `unsupported_value`): any, for
# metadata and hints that do not change the answer; only the value that does not change
# it, for the rest; nothing but null for features this server does not have.
OPENAI_ONLY_FIELDS: dict[str, Callable[[Any], bool]] = {
    # Metadata and hints that do not change the answer.
    "metadata": lambda value: True,
    "safety_identifier": lambda value: True,
    "prompt_cache_key": lambda value: True,  # vLLM's prefix cache needs no key
    "prompt_cache_retention": _is("in_memory", "in-memory", "24h"),
    "prompt_cache_options": lambda value: True,
    "prediction": lambda value: True,  # predicted outputs only speed up; answers are the same
    "stream_options": lambda value: True,  # /v1/responses: include_obfuscation only
    "service_tier": _is("auto", "default"),
    "store": _is(False),  # nothing is stored for later retrieval
    "modalities": lambda value: value is None or value == ["text"],
    "verbosity": _is("medium"),
    "best_of": _is(1),
    # Features this server does not have.
    "audio": _unset,
    "web_search_options": _unset,
    "functions": _unset,
    "function_call": _unset,
    "moderation": _unset,
    "conversation": _unset,
    "context_management": _unset,
}

REFUSAL_HINTS = {
    "functions": "use 'tools' instead",
    "function_call": "use 'tool_choice' instead",
    "store": "this server stores no completions",
    "best_of": "use 'n' instead",
    "modalities": "this server answers with text only: ['text']",
}


def check_fields(body: BaseModel) -> None:
    """Refuse fields vLLM would ignore, and beam search (see module docstring)."""
    for name, value in (body.model_extra or {}).items():
        accept = OPENAI_ONLY_FIELDS.get(name)
        if accept is None:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        typed, expected = OPENAI_FIELD_TYPES.get(name, (lambda _: True, ""))
        if not typed(value):
            raise InvalidRequest(
                f"Invalid type for '{name}': expected {expected}.",
                param=name,
                code="invalid_type",
            )
        if not accept(value):
            hint = REFUSAL_HINTS.get(name, "this server does not support it")
            raise InvalidRequest(
                f"'{name}' = {value!r} is not supported: {hint}.",
                param=name,
                code="unsupported_value",
            )
    if getattr(body, "use_beam_search", False):
        raise InvalidRequest(
            "'use_beam_search' is not supported: the gateway cannot price beam search before "
            "it runs.",
            param="use_beam_search",
            code="unsupported_value",
        )
    if getattr(body, "length_penalty", 1.0) not in (1.0, None):
        # vLLM reads it only for beam search: any other value would be ignored
        raise InvalidRequest(
            "'length_penalty' applies to beam search only, which this server does not run; "
            "leave it at 1.0.",
            param="length_penalty",
            code="unsupported_value",
        )
