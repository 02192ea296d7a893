"""Redaction of personal data and secrets in text that is about to be logged.

Used only when prompt and output logging is switched on (`telemetry.log_prompts`); by default
neither is logged at all. What is replaced, each by a tag naming what was there:

- e-mail addresses                                   → `[EMAIL]`
- API keys and bearer tokens (`sk-…`, `Bearer …`,
  long hex or base64-like secrets)                   → `[API_KEY]`
- credit-card-like numbers (13-19 digits, spaces or
  dashes allowed, passing the Luhn check)            → `[CARD]`
- phone numbers (7-15 digits with +, spaces, dots,
  dashes or parentheses)                             → `[PHONE]`

The order matters: keys and cards are removed before the looser phone pattern runs.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
API_KEY = re.compile(
    r"(?:\b(?:sk|pk|rk|sess|key)-[A-Za-z0-9_-]{16,}\b)"
    r"|(?:\bBearer\s+[A-Za-z0-9._~+/=-]{16,})"
    r"|(?:\b[A-Fa-f0-9]{32,}\b)"
    r"|(?:\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{40,}\b)"
)
CARD_CANDIDATE = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
PHONE = re.compile(r"(?<![\w])(?:\+?\d[\d\s().-]{5,}\d)(?![\w])")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[PHONE]" if 7 <= len(digits) <= 15 else match.group(0)


def redact(text: str) -> str:
    """`text` with e-mails, API keys, card numbers and phone numbers replaced by tags."""
    text = EMAIL.sub("[EMAIL]", text)
    text = API_KEY.sub("[API_KEY]", text)
    text = CARD_CANDIDATE.sub(_card, text)
    return PHONE.sub(_phone, text)
