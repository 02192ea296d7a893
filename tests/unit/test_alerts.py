"""Budget alerts: each threshold fires once per budget window, whichever replica's settlement
crosses it; the webhook is retried and never fails a request."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from sluice.config import AdmissionSettings, GatewaySettings, PricingSettings
from sluice.errors import QuotaExceeded
from sluice.gateway.admission import Admission
from sluice.gateway.alerts import BudgetAlerts, BudgetCrossing, crossings
from sluice.gateway.auth import KeyRing, Principal
from sluice.gateway.keys import KeyPolicy
from sluice.gateway.quota import Grant, Limits, Settlement, spend_field
from sluice.gateway.service import Gateway
from sluice.gateway.store_redis import RedisQuota, RedisStore
from tests.conftest import FakeClock
from tests.redis_server import RedisServer
from tests.unit.test_auth import MemoryKeyStore

LIMITS = Limits(budget_tokens=100, budget_tokens_window="day", budget_usd=1.0)


def settled(tokens: int, usd: float, at: float, limits: Limits = LIMITS) -> Settlement:
    return Settlement(Grant("r", "team", tokens, usd), tokens, usd, at, limits)


def test_a_settlement_crossing_thresholds_reports_each_once(clock: FakeClock) -> None:
    day = spend_field("day", clock())
    month = spend_field("month", clock())
    spent = {day: (85, 0.5), month: (85, 0.5)}
    (crossing,) = crossings(settled(15, 0.1, clock()), spent, [0.8, 1.0])  # 70 -> 85 tokens
    assert (crossing.unit, crossing.threshold, crossing.window) == ("tokens", 0.8, "day")
    assert (crossing.budget, crossing.spent) == (100, 85)
    assert crossings(settled(5, 0.0, clock()), {day: (90, 0.5)}, [0.8, 1.0]) == []  # past 80
    both = crossings(settled(40, 0.6, clock()), {day: (100, 1.0), month: (100, 1.0)}, [0.8, 1.0])
    assert {(c.unit, c.threshold) for c in both} == {
        ("tokens", 0.8),
        ("tokens", 1.0),
        ("usd", 0.8),
        ("usd", 1.0),
    }
    no_budget = crossings(settled(50, 0.0, clock(), Limits(rpm=5)), {day: (100, 0)}, [0.8])
    assert no_budget == []


@pytest.fixture
async def replicas(
    redis_server: RedisServer, clock: FakeClock
) -> AsyncIterator[tuple[list[Gateway], list[BudgetCrossing]]]:
    seen: list[BudgetCrossing] = []
    gateways = [
        Gateway(
            GatewaySettings(store="redis", redis_url=redis_server.url),
            PricingSettings(),
            KeyRing({}, MemoryKeyStore(), 0.0),
            RedisQuota(RedisStore(redis_server.url, 1.0), clock=clock),
            Admission(AdmissionSettings(), lambda: None),
            clock=clock,
            alerts=BudgetAlerts([0.8, 1.0], on_crossing=seen.append),
        )
        for _ in range(2)
    ]
    yield gateways, seen
    for gateway in gateways:
        await gateway.close()


async def test_thresholds_fire_once_per_window_across_replicas(
    replicas: tuple[list[Gateway], list[BudgetCrossing]], clock: FakeClock
) -> None:
    gateways, seen = replicas
    team = Principal("team", KeyPolicy(name="team", budget_tokens=90, budget_tokens_window="day"))

    async def serve(gateway: Gateway) -> None:
        ticket = await gateway.reserve(team, "m", prompt_tokens=10, max_output_tokens=5)
        gateway.on_tokens(ticket, 5)
        await gateway.settle(ticket)

    for i in range(6):  # 15 tokens each, alternating replicas: 90 = the whole budget
        await serve(gateways[i % 2])
    with pytest.raises(QuotaExceeded):
        await serve(gateways[0])
    assert [(c.threshold, c.spent) for c in seen] == [(0.8, 75), (1.0, 90)]
    clock.advance(86400)  # the next day: a new window, the thresholds fire again
    for i in range(6):
        await serve(gateways[i % 2])
    assert [c.threshold for c in seen] == [0.8, 1.0, 0.8, 1.0]


async def test_the_webhook_is_retried_and_a_dead_one_only_logs(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    received: list[dict[str, object]] = []
    failures = [500]

    def answer(request: httpx.Request) -> httpx.Response:
        if failures:
            return httpx.Response(failures.pop())
        received.append(json.loads(request.content))
        return httpx.Response(204)

    alerts = BudgetAlerts(
        [0.8], "http://hooks.example/budget", transport=httpx.MockTransport(answer)
    )
    day = spend_field("day", clock())
    alerts.observe(settled(15, 0.0, clock()), {day: (85, 0.0)})
    await alerts.close()
    (body,) = received
    assert body["type"] == "budget.threshold_crossed"
    assert (body["key"], body["unit"], body["threshold"], body["spent"]) == (
        "team",
        "tokens",
        0.8,
        85.0,
    )

    dead = BudgetAlerts(
        [0.8],
        "http://hooks.example/budget",
        transport=httpx.MockTransport(lambda _: httpx.Response(503)),
    )
    with caplog.at_level(logging.ERROR, logger="sluice.gateway.alerts"):
        dead.observe(settled(15, 0.0, clock()), {day: (85, 0.0)})
        await asyncio.wait_for(dead.close(), 30)
    assert "budget webhook failed after 3 attempts" in caplog.text
