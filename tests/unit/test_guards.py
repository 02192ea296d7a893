"""Guards: the key's model allowlist and the max_tokens, n and prompt-count caps."""

from __future__ import annotations

import pytest

from sluice.config import LimitSettings
from sluice.errors import InvalidRequest, PermissionDenied
from sluice.gateway.auth import OPEN, Principal
from sluice.gateway.guards import check_allowed, check_max_tokens, check_n
from sluice.gateway.keys import KeyPolicy

LIMITS = LimitSettings(max_tokens_cap=100, max_n=4, max_prompts=3, max_embedding_inputs=5)


def key(**policy: object) -> Principal:
    return Principal("team", KeyPolicy(name="team", **policy))  # type: ignore[arg-type]


def test_open_server_allows_every_model() -> None:
    check_allowed("anything", OPEN)


def test_allowlist() -> None:
    principal = key(models=["a", "my-lora"])
    check_allowed("my-lora", principal)
    with pytest.raises(PermissionDenied) as caught:
        check_allowed("b", principal)
    assert caught.value.param == "model"
    assert "'team'" in caught.value.message


@pytest.mark.parametrize("requested", [None, 1, 100])
def test_max_tokens_within_caps(requested: int | None) -> None:
    check_max_tokens(requested, "max_tokens", OPEN, LIMITS)


def test_max_tokens_over_server_cap_names_the_clients_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_max_tokens(101, "max_completion_tokens", OPEN, LIMITS)
    assert caught.value.param == "max_completion_tokens"
    assert "(100)" in caught.value.message


def test_max_tokens_over_key_cap() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_max_tokens(11, "max_output_tokens", key(max_tokens=10), LIMITS)
    assert caught.value.param == "max_output_tokens"
    assert "API key 'team'" in caught.value.message


def test_check_n_within_caps() -> None:
    check_n(4, 3, LIMITS)
    check_n(None, 1, LIMITS)


def test_check_n_over_cap() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_n(5, 1, LIMITS)
    assert caught.value.param == "n"


def test_check_n_too_many_prompts() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_n(1, 4, LIMITS)
    assert caught.value.param == "prompt"


def test_embedding_inputs_have_their_own_cap() -> None:
    """An embeddings `input` list is capped by `max_embedding_inputs` (OpenAI's 2,048 by
    default), not the completions prompt cap, and the error names `input`."""
    check_n(None, 5, LIMITS, embeddings=True)
    with pytest.raises(InvalidRequest) as caught:
        check_n(None, 6, LIMITS, embeddings=True)
    assert caught.value.param == "input"
    assert LimitSettings().max_embedding_inputs == 2048
