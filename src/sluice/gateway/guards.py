"""Guards: checks on a request that need the model card or the limits, before engine work.

They turn a validated body into numbers the engine can run (`max_tokens` resolved against the
context window and the configured caps) or refuse with a typed error naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.config import LimitSettings
from sluice.engine.protocol import ModelCard
from sluice.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, PermissionDenied
from sluice.gateway.auth import OPEN, Principal


@dataclass(frozen=True)
class Caps:
    """What the caller's key and the server's gate allow one request."""

    principal: Principal = OPEN
    clamp: int | None = None  # the admission gate's max_tokens, while it is closed

    @property
    def key_max_tokens(self) -> int | None:
        policy = self.principal.policy
        return policy.max_tokens if policy is not None else None

    def clamped(self, max_tokens: int) -> int:
        """`max_tokens` lowered to the gate's clamp, if the gate is closed."""
        return max_tokens if self.clamp is None else min(max_tokens, self.clamp)


NO_CAPS = Caps()


def check_model(requested: str, card: ModelCard) -> None:
    """Refuse any model id but the one served."""
    if requested != card.id:
        raise ModelNotFound(
            f"The model '{requested}' does not exist on this server. Available: '{card.id}'.",
            param="model",
        )


def check_allowed(model: str, principal: Principal) -> None:
    """Refuse a model the key may not use (403)."""
    policy = principal.policy
    if policy is not None and not policy.allows_model(model):
        raise PermissionDenied(
            f"The API key '{principal.name}' is not allowed to use the model '{model}'.",
            param="model",
        )


def check_n(n: int, prompts: int, limits: LimitSettings) -> None:
    """Refuse `n` or a prompt list above the configured caps."""
    if n > limits.max_n:
        raise InvalidRequest(f"n={n} is more than this server allows ({limits.max_n}).", param="n")
    if prompts > limits.max_prompts:
        raise InvalidRequest(
            f"{prompts} prompts in one request is more than this server allows "
            f"({limits.max_prompts}).",
            param="prompt",
        )


def resolve_max_tokens(
    *,
    prompt_tokens: int,
    requested: int | None,
    default: int | None,
    card: ModelCard,
    limits: LimitSettings,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
    caps: Caps = NO_CAPS,
) -> int:
    """The completion budget of one choice; `default=None` means "what is left of the context".

    Raises `InvalidRequest` when `requested` is over the server's or the key's cap and
    `ContextLengthExceeded` when prompt plus completion cannot fit the model's context. The
    admission gate's clamp lowers the result without refusing.
    """
    key_cap = caps.key_max_tokens
    if requested is not None and key_cap is not None and requested > key_cap:
        raise InvalidRequest(
            f"{max_tokens_param}={requested} is more than the API key '{caps.principal.name}' "
            f"allows ({key_cap}).",
            param=max_tokens_param,
        )
    cap = limits.max_tokens_cap if key_cap is None else min(key_cap, limits.max_tokens_cap)
    if requested is not None and requested > limits.max_tokens_cap:
        raise InvalidRequest(
            f"{max_tokens_param}={requested} is more than this server allows "
            f"({limits.max_tokens_cap}).",
            param=max_tokens_param,
        )
    room = card.max_model_len - prompt_tokens
    if requested is None:
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {card.max_model_len} tokens. However, "
                f"your prompt has {prompt_tokens} tokens, which leaves no room for a "
                "completion. Please shorten the prompt.",
                param=prompt_param,
            )
        wanted = default if default is not None else room
        return caps.clamped(max(1, min(wanted, room, cap)))
    if prompt_tokens + requested > card.max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {card.max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} in the completion). Please reduce the prompt or the completion "
            "length.",
            param=prompt_param,
        )
    return caps.clamped(requested)
