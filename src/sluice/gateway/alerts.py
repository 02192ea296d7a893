"""Budget alerts: a key's spend crossing a share of its budget (by default 80% and 100%) fires
a metric, a log line and, if configured, a webhook, once per budget window.

"Once" needs no bookkeeping: the stores add spend atomically and return the window's total
after each settlement (store_redis.py `SETTLE`, `LocalQuota.settle`), so exactly one
settlement sees the total go from below a threshold to at or above it, whichever replica
made it. A new window starts from zero, so each threshold fires again in the next one.

The webhook is a JSON POST (`type: budget.threshold_crossed`) sent in the background with
retries (tenacity: 3 attempts, exponential backoff); a webhook that stays down is logged and
never delays or fails a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from sluice.gateway.keys import Window
from sluice.gateway.quota import Settlement, Spent, spend_field, window_bounds

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_ATTEMPTS = 3


@dataclass(frozen=True)
class BudgetCrossing:
    """A key's spend reached `threshold` (a share) of one of its budgets in a window."""

    key: str
    unit: str  # "tokens" or "usd"
    window: Window
    window_start: float  # epoch seconds, UTC
    threshold: float
    budget: float
    spent: float
    at: float  # when the crossing request ended

    def body(self) -> dict[str, object]:
        return {"type": "budget.threshold_crossed", **asdict(self)}


def crossings(
    settlement: Settlement, spent: Spent, thresholds: list[float]
) -> list[BudgetCrossing]:
    """The thresholds this settlement's spend crossed, given the windows' totals after it."""
    limits = settlement.limits
    if limits is None or not spent:
        return []
    found = []
    budgets: tuple[tuple[str, float | None, Window, float, int], ...] = (
        ("tokens", limits.budget_tokens, limits.budget_tokens_window, settlement.tokens, 0),
        ("usd", limits.budget_usd, limits.budget_usd_window, settlement.usd, 1),
    )
    for unit, budget, window, added, part in budgets:
        totals = spent.get(spend_field(window, settlement.at))
        if budget is None or totals is None or added <= 0:
            continue
        after = float(totals[part])
        before = after - added
        for threshold in thresholds:
            level = threshold * budget
            if before < level <= after:
                start = window_bounds(window, settlement.at)[0]
                found.append(
                    BudgetCrossing(
                        settlement.grant.key,
                        unit,
                        window,
                        start,
                        threshold,
                        budget,
                        after,
                        settlement.at,
                    )
                )
    return found


class BudgetAlerts:
    """Reports crossings (module docstring): `on_crossing` (the metric), a warning line, and
    the webhook at `webhook_url` if set."""

    def __init__(
        self,
        thresholds: list[float],
        webhook_url: str | None = None,
        on_crossing: Callable[[BudgetCrossing], None] = lambda _: None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.thresholds = sorted(thresholds)
        self.webhook_url = webhook_url
        self.on_crossing = on_crossing
        self._transport = transport
        self._sending: set[asyncio.Task[None]] = set()

    def observe(self, settlement: Settlement, spent: Spent) -> None:
        for crossing in crossings(settlement, spent, self.thresholds):
            self.on_crossing(crossing)
            logger.warning(
                "key %s has spent %.0f%% of its %s budget for this %s",
                crossing.key,
                crossing.threshold * 100,
                crossing.unit,
                crossing.window,
                extra={"budget_alert": crossing.body()},
            )
            if self.webhook_url is not None:
                task = asyncio.get_running_loop().create_task(self._send(crossing))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, crossing: BudgetCrossing) -> None:
        assert self.webhook_url is not None
        try:
            async with httpx.AsyncClient(
                timeout=WEBHOOK_TIMEOUT_S, transport=self._transport
            ) as client:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(WEBHOOK_ATTEMPTS),
                    wait=wait_exponential(multiplier=0.5, max=5),
                    reraise=False,
                ):
                    with attempt:
                        response = await client.post(self.webhook_url, json=crossing.body())
                        response.raise_for_status()
        except (RetryError, httpx.HTTPError) as exc:
            logger.error(
                "budget webhook failed after %d attempts (%s): key %s, %s at %.0f%%",
                WEBHOOK_ATTEMPTS,
                exc,
                crossing.key,
                crossing.unit,
                crossing.threshold * 100,
            )

    async def close(self) -> None:
        """Let webhooks under way finish (each is bounded by its timeout and retries)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
