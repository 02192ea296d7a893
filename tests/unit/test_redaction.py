"""Redaction of what prompt logging would otherwise write."""

from __future__ import annotations

import pytest

from sluice.telemetry.redaction import redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "mail me at [EMAIL] please"),
        ("key sk-abcdefghijklmnop1234567890 ok", "key [API_KEY] ok"),
        ("Authorization: Bearer abcdefghijklmnopqrstuvwx", "Authorization: [API_KEY]"),
        ("token 0123456789abcdef0123456789abcdef", "token [API_KEY]"),
        ("card 4111 1111 1111 1111 exp", "card [CARD] exp"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("call +1 (415) 555-0100 now", "call [PHONE] now"),
        ("call 020 7946 0958", "call [PHONE]"),
    ],
)
def test_sensitive_values_are_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "Count: 1, 2, 3, 4, 5",
        "in 2024 we sold 12 units",
        "version 1.2.3",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_a_number_failing_luhn_is_not_a_card() -> None:
    # 16 digits but not a valid card number: not a card, though long digit runs are phone-like
    assert "[CARD]" not in redact("order 1234 5678 9012 3456")
