"""Parse `text/event-stream` bodies the way an OpenAI client reads them, checking the framing."""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of a complete SSE body, asserting OpenAI's framing on the way.

    Every event is exactly one `data: <payload>` line followed by a blank line, and the body
    ends right after the `data: [DONE]` event.
    """
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-40:]!r}"
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), f"not a data event: {event!r}"
        assert "\n" not in event, f"event spans several lines: {event!r}"
        payloads.append(event.removeprefix("data: "))
    assert payloads[-1] == DONE, f"stream does not end with data: [DONE]: {payloads[-1]!r}"
    assert payloads.count(DONE) == 1, "data: [DONE] is sent more than once"
    return payloads


def sse_json(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a complete SSE body (everything before `data: [DONE]`)."""
    return [json.loads(payload) for payload in sse_data(text)[:-1]]
