"""Admission: load shedding on the engine's queue, and the server-wide generation gate.

Load is the larger of `waiting / max_waiting` (the engine's own scheduler count) and
`queued_tokens / max_queued_tokens` (prompt tokens of admitted requests that have not
produced a token yet; vLLM does not report queued tokens, so the gateway counts them).
Decided before any tokenising or engine work:

- `low` priority is refused with probability rising linearly from 0 at `low_shed_from` of
  capacity to 1 at capacity;
- `normal` is refused at capacity;
- `high` only past `high_headroom` times capacity.

A refusal is 503 `overloaded` with a `Retry-After` from the current drain rate (requests
finished over the last 30 s). The gate: while tokens generated across the server over the
last minute exceed `gate_tokens_per_min`, `normal` and `low` requests have `max_tokens`
clamped to `gate_max_tokens`, and `low` is refused.
"""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Callable

from sluice.config import AdmissionSettings
from sluice.engine.protocol import EngineStats
from sluice.errors import ServiceUnavailable
from sluice.gateway.keys import Priority
from sluice.gateway.quota import Clock

DRAIN_WINDOW_S = 30.0
GATE_WINDOW_S = 60


class Overloaded(ServiceUnavailable):
    """The engine's queue is past its cap for this priority."""


class Admission:
    """Decides whether a request of some priority may queue now, and what it may generate."""

    def __init__(
        self,
        settings: AdmissionSettings,
        stats: Callable[[], EngineStats | None],
        clock: Clock = time.monotonic,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.clock = clock
        self.chance = chance
        self.queued_tokens = 0
        self._finished: collections.deque[float] = collections.deque()
        self._generated: collections.deque[tuple[int, int]] = collections.deque()  # (second, n)

    def load(self) -> float:
        """Current load as a share of the caps (0 when no cap is set)."""
        shares = [0.0]
        s = self.settings
        if s.max_waiting is not None:
            stats = self.stats()
            if stats is not None:
                shares.append(stats.waiting / s.max_waiting)
        if s.max_queued_tokens is not None:
            shares.append(self.queued_tokens / s.max_queued_tokens)
        return max(shares)

    def gate_closed(self) -> bool:
        limit = self.settings.gate_tokens_per_min
        return limit is not None and self.generated_last_minute() > limit

    def check(self, priority: Priority) -> int | None:
        """Refuse with `Overloaded`, or admit: the `max_tokens` clamp to apply, if any."""
        load = self.load()
        s = self.settings
        shed = False
        if priority == "high":
            shed = load >= s.high_headroom
        elif priority == "normal":
            shed = load >= 1.0
        else:
            refuse_chance = min(1.0, max(0.0, (load - s.low_shed_from) / (1 - s.low_shed_from)))
            shed = refuse_chance > 0 and self.chance() < refuse_chance
        if shed:
            raise Overloaded(
                f"The server is overloaded ({load:.0%} of its queue capacity); {priority} "
                "priority requests are being shed. Retry later.",
                retry_after_s=self.retry_after_s(load),
            )
        if priority == "high" or not self.gate_closed():
            return None
        if priority == "low":
            raise Overloaded(
                "The server is over its generation budget; low priority requests are being "
                "shed. Retry later.",
                retry_after_s=self.retry_after_s(1.0),
            )
        return s.gate_max_tokens

    def retry_after_s(self, load: float) -> float:
        """Time for the queue to drain back under capacity at the recent finishing rate."""
        now = self.clock()
        self._trim(now)
        rate = len(self._finished) / DRAIN_WINDOW_S
        stats = self.stats()
        waiting = stats.waiting if stats is not None else 0
        excess = max(1.0, waiting * (1 - 1 / max(load, 1.0)) + 1)
        if rate <= 0:
            return 10.0
        return min(60.0, max(1.0, math.ceil(excess / rate)))

    def queued(self, tokens: int) -> None:
        self.queued_tokens += tokens

    def started(self, tokens: int) -> None:
        self.queued_tokens = max(0, self.queued_tokens - tokens)

    def finished(self) -> None:
        now = self.clock()
        self._finished.append(now)
        self._trim(now)

    def generated(self, tokens: int) -> None:
        """Tokens just generated, for the gate's one-minute sum."""
        now = self.clock()
        if tokens > 0:
            generated = tokens
            second = int(now)
            if self._generated and self._generated[-1][0] == second:
                self._generated[-1] = (second, self._generated[-1][1] + generated)
            else:
                self._generated.append((second, generated))

    def generated_last_minute(self) -> int:
        self._trim(self.clock())
        return sum(n for _, n in self._generated)

    def _trim(self, now: float) -> None:
        while self._finished and self._finished[0] < now - DRAIN_WINDOW_S:
            self._finished.popleft()
        while self._generated and self._generated[0][0] <= now - GATE_WINDOW_S:
            self._generated.popleft()
