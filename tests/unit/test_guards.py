"""Guards: max_tokens against the cap and the context window, the served model, n caps."""

from __future__ import annotations

import pytest

from sluice.config import LimitSettings
from sluice.engine.protocol import ModelCard
from sluice.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from sluice.gateway.guards import check_model, check_n, resolve_max_tokens

CARD = ModelCard(id="m", max_model_len=100, created=0)
LIMITS = LimitSettings(max_tokens_cap=50, max_n=4, max_prompts=3)


def resolve(
    prompt_tokens: int,
    requested: int | None,
    default: int | None = None,
    *,
    limits: LimitSettings = LIMITS,
    max_tokens_param: str = "max_tokens",
) -> int:
    return resolve_max_tokens(
        prompt_tokens=prompt_tokens,
        requested=requested,
        default=default,
        card=CARD,
        limits=limits,
        prompt_param="prompt",
        max_tokens_param=max_tokens_param,
    )


def test_requested_is_kept_when_it_fits() -> None:
    assert resolve(10, 20) == 20


def test_requested_may_fill_the_context_exactly() -> None:
    assert resolve(60, 40) == 40


def test_requested_over_cap() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve(10, 51)
    assert type(info.value) is InvalidRequest
    assert info.value.param == "max_tokens"
    assert "51" in info.value.message
    assert "50" in info.value.message


def test_requested_over_cap_names_the_field_the_client_used() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve(10, 51, max_tokens_param="max_completion_tokens")
    assert info.value.param == "max_completion_tokens"
    assert info.value.message.startswith("max_completion_tokens=51 ")


def test_cap_is_checked_before_context() -> None:
    # over the cap and over the context: the cap is the client's own mistake to fix first
    with pytest.raises(InvalidRequest) as info:
        resolve(99, 51)
    assert type(info.value) is InvalidRequest


def test_context_overflow() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        resolve(61, 40)
    assert info.value.param == "prompt"
    assert info.value.code is None  # the table supplies context_length_exceeded
    message = info.value.message
    assert "maximum context length is 100 tokens" in message
    assert "requested 101 tokens (61 in the prompt, 40 in the completion)" in message


def test_default_none_means_remaining_context() -> None:
    assert resolve(70, None, None) == 30


def test_default_none_is_clipped_by_the_cap() -> None:
    assert resolve(10, None, None) == 50


def test_default_16_when_there_is_room() -> None:
    assert resolve(10, None, 16) == 16


def test_default_16_clipped_by_room() -> None:
    assert resolve(95, None, 16) == 5


def test_default_clipped_by_a_small_cap() -> None:
    assert resolve(10, None, 16, limits=LimitSettings(max_tokens_cap=8)) == 8


def test_one_token_of_room_is_enough() -> None:
    assert resolve(99, None, 16) == 1


@pytest.mark.parametrize("prompt_tokens", [100, 150])
def test_no_room_left_for_a_default(prompt_tokens: int) -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        resolve(prompt_tokens, None, 16)
    assert info.value.param == "prompt"
    assert f"your prompt has {prompt_tokens} tokens" in info.value.message


def test_check_model_accepts_the_served_id() -> None:
    check_model("m", CARD)


@pytest.mark.parametrize("requested", ["other", "M", "m ", ""])
def test_check_model_refuses_anything_else(requested: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        check_model(requested, CARD)
    assert info.value.param == "model"
    assert f"'{requested}'" in info.value.message
    assert "'m'" in info.value.message  # tells the client what is available


def test_check_n_within_caps() -> None:
    check_n(4, 3, LIMITS)


def test_check_n_over_cap() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_n(5, 1, LIMITS)
    assert info.value.param == "n"
    assert "n=5" in info.value.message


def test_check_n_too_many_prompts() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_n(1, 4, LIMITS)
    assert info.value.param == "prompt"
    assert "4 prompts" in info.value.message
