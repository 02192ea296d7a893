"""Guards: the gateway's checks on a request body before any engine work.

vLLM's serving layer validates the request itself (fields, the model id, the context
window); these add what a multi-tenant server needs on top: the key's model allowlist, the
server's and the key's `max_tokens` caps (a request asking for more is a 400 naming the
field; a request that asks for nothing is lowered to the caps by the exchange), and the caps
on `n` and on the number of prompts in one request.
"""

from __future__ import annotations

from sluice.config import LimitSettings
from sluice.errors import InvalidRequest, PermissionDenied
from sluice.gateway.auth import Principal


def check_allowed(model: str, principal: Principal) -> None:
    """Refuse a model the key may not use (403)."""
    policy = principal.policy
    if policy is not None and not policy.allows_model(model):
        raise PermissionDenied(
            f"The API key '{principal.name}' is not allowed to use the model '{model}'.",
            param="model",
        )


def check_max_tokens(
    requested: int | None, param: str, principal: Principal, limits: LimitSettings
) -> None:
    """Refuse a `max_tokens` (by whatever name the endpoint gives it) over the key's cap or
    the server's."""
    if requested is None:
        return
    policy = principal.policy
    key_cap = policy.max_tokens if policy is not None else None
    if key_cap is not None and requested > key_cap:
        raise InvalidRequest(
            f"{param}={requested} is more than the API key '{principal.name}' allows ({key_cap}).",
            param=param,
        )
    if requested > limits.max_tokens_cap:
        raise InvalidRequest(
            f"{param}={requested} is more than this server allows ({limits.max_tokens_cap}).",
            param=param,
        )


def check_n(
    n: int | None, prompts: int, limits: LimitSettings, *, embeddings: bool = False
) -> None:
    """Refuse `n` or a prompt list above the configured caps: `max_prompts` for completions'
    `prompt`, `max_embedding_inputs` (OpenAI's 2,048 by default) for embeddings' `input`."""
    if n is not None and n > limits.max_n:
        raise InvalidRequest(f"n={n} is more than this server allows ({limits.max_n}).", param="n")
    cap, param = (
        (limits.max_embedding_inputs, "input") if embeddings else (limits.max_prompts, "prompt")
    )
    if prompts > cap:
        raise InvalidRequest(
            f"{prompts} {param}s in one request is more than this server allows ({cap}).",
            param=param,
        )
