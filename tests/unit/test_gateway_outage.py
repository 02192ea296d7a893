"""The gateway across a real Redis outage: nothing the store missed is lost or left behind.

Each test injects the fault on a real `redis-server`: stopped (connections refused) or
frozen with SIGSTOP (calls time out on the client while Redis still holds them, and runs
them when it resumes). A request uses 10 prompt and 5 output tokens (15 in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

import pytest

from sluice.config import AdmissionSettings, GatewaySettings, PricingSettings
from sluice.errors import QuotaExceeded
from sluice.gateway.admission import Admission
from sluice.gateway.auth import KeyRing, Principal
from sluice.gateway.keys import KeyPolicy
from sluice.gateway.service import REPLAY_RETRY_S, Gateway
from sluice.gateway.store_redis import RedisQuota, RedisStore, StoreFailure
from tests.redis_server import RedisServer
from tests.unit.test_auth import MemoryKeyStore

TIMEOUT_S = 0.2
PROMPT, OUTPUT = 10, 5
USED = PROMPT + OUTPUT

GatewayFactory = Callable[[Literal["open", "closed"]], Gateway]


@pytest.fixture
async def make_gateway(redis_server: RedisServer) -> AsyncIterator[GatewayFactory]:
    made: list[Gateway] = []

    def make(failure: Literal["open", "closed"]) -> Gateway:
        gateway = Gateway(
            GatewaySettings(store="redis", redis_url=redis_server.url, redis_failure=failure),
            PricingSettings(),
            KeyRing({}, MemoryKeyStore(), 0.0),
            RedisQuota(RedisStore(redis_server.url, TIMEOUT_S)),
            Admission(AdmissionSettings(), lambda: None),
            request_timeout_s=30.0,
        )
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.close()


@contextlib.contextmanager
def frozen(redis_server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) for the block: calls time out on the client while Redis holds
    them, and run when it resumes at the block's end."""
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)


def principal(**policy: int) -> Principal:
    return Principal("team", KeyPolicy(name="team", **policy))  # type: ignore[arg-type]


async def serve(gateway: Gateway, who: Principal) -> None:
    """One request as the routes run it: reserve, generate OUTPUT tokens, settle."""
    ticket = await gateway.reserve(who, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
    gateway.on_tokens(ticket, OUTPUT)
    await gateway.settle(ticket)


async def shared(redis_server: RedisServer, key: str = "team") -> tuple[int, int]:
    """Month tokens spent and tokens reserved now, as Redis holds them (a fresh client)."""
    quota = RedisQuota(RedisStore(redis_server.url, 2.0))
    try:
        usage = await quota.usage(key)
    finally:
        await quota.close()
    return usage.windows[2].tokens, usage.reserved_tokens


async def test_spend_served_while_redis_was_down_reaches_it_and_counts_in_the_budget(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = make_gateway("open")
    team = principal(budget_tokens=8 * USED)
    await serve(gateway, team)
    redis_server.stop()
    for _ in range(5):
        await serve(gateway, team)  # admitted by the local fallback
    assert len(gateway.pending) == 5
    redis_server.start()
    for _ in range(2):
        await serve(gateway, team)
    assert await shared(redis_server) == (8 * USED, 0)
    with pytest.raises(QuotaExceeded):  # the budget counts what was served in the outage
        await gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)


async def test_the_backlog_is_sent_without_new_traffic(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = make_gateway("open")
    team = principal(rpm=100)
    await serve(gateway, team)
    redis_server.stop()
    for _ in range(3):
        await serve(gateway, team)
    redis_server.start()
    for _ in range(int(10 / REPLAY_RETRY_S)):
        if not gateway.pending:
            break
        await asyncio.sleep(REPLAY_RETRY_S)
    assert not gateway.pending
    assert await shared(redis_server) == (4 * USED, 0)


async def test_a_settlement_that_failed_mid_request_is_sent_once(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = make_gateway("closed")
    team = principal(budget_tokens=1000)
    ticket = await gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
    gateway.on_tokens(ticket, OUTPUT)
    with frozen(redis_server):  # the settlement times out, Redis keeps it
        await gateway.settle(ticket)
    assert len(gateway.pending) == 1
    await gateway.send_pending()  # resent: the store must not count it twice
    assert await shared(redis_server) == (USED, 0)


async def test_an_outage_does_not_hand_a_key_a_fresh_budget(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """Fail-open: the fallback starts from what the key's budget had left at its last
    reservation through Redis, so each replica cannot spend a whole budget again."""
    gateway = make_gateway("open")
    team = principal(budget_tokens=4 * USED)
    for _ in range(3):
        await serve(gateway, team)
    with frozen(redis_server):
        await serve(gateway, team)  # the budget's last request, from the fallback
        with pytest.raises(QuotaExceeded):
            await serve(gateway, team)
    await gateway.send_pending()
    assert await shared(redis_server) == (4 * USED, 0)


async def test_what_an_outage_served_counts_once_in_the_next_outage(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """An outage before the key's first reservation through Redis: what the fallback served
    reaches Redis with the backlog, so the fallback must forget it when Redis is back, or the
    next outage counts it twice (its seed, Redis's figure, already includes it)."""
    gateway = make_gateway("open")
    team = principal(budget_tokens=7 * USED)
    with frozen(redis_server):
        for _ in range(2):
            await serve(gateway, team)  # from the fallback, knowing nothing of the budget
    await serve(gateway, team)  # through Redis, after the backlog: 3 served
    with frozen(redis_server):
        for _ in range(4):
            await serve(gateway, team)  # 4 more fit the budget of 7
        with pytest.raises(QuotaExceeded):
            await serve(gateway, team)
    await gateway.send_pending()
    assert await shared(redis_server) == (7 * USED, 0)


async def test_a_settlement_whose_task_is_cancelled_is_kept_and_sent_at_shutdown(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """The server's cut-off cancels a request's task while its SETTLE waits on Redis: the
    spend goes to the backlog, and shutting the gateway down sends it."""
    gateway = make_gateway("closed")
    team = principal(budget_tokens=1000)
    first = await gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
    second = await gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
    for ticket in (first, second):
        gateway.on_tokens(ticket, OUTPUT)
    with frozen(redis_server):
        settling = asyncio.create_task(gateway.settle(first))
        await asyncio.sleep(0.05)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        gateway.settle_later(second)  # an owner that can no longer wait
    assert len(gateway.pending) == 2
    await gateway.close()
    assert await shared(redis_server) == (2 * USED, 0)


@pytest.mark.parametrize("failure", ["open", "closed"])
async def test_a_reservation_redis_runs_after_the_gateway_gave_up_is_not_left_behind(
    make_gateway: GatewayFactory, redis_server: RedisServer, failure: Literal["open", "closed"]
) -> None:
    gateway = make_gateway(failure)
    team = principal(budget_tokens=1000, tpm=1000)
    await serve(gateway, team)  # connected
    with frozen(redis_server):
        if failure == "open":
            await serve(gateway, team)  # reserve times out: served from the local fallback
        else:
            with pytest.raises(StoreFailure):
                await gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
    # (Redis has now run the stalled reservation)
    await gateway.send_pending()
    spent = 2 * USED if failure == "open" else USED
    assert await shared(redis_server) == (spent, 0)
    await serve(gateway, team)  # and the store keeps working for the next request
    assert await shared(redis_server) == (spent + USED, 0)


async def test_a_request_cancelled_while_redis_holds_its_reservation_leaves_nothing(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """The client goes away while a stalled Redis has the RESERVE: it runs later, and the
    gateway closes it."""
    gateway = make_gateway("closed")
    team = principal(budget_tokens=1000, max_concurrent=1)
    await serve(gateway, team)  # connected
    with frozen(redis_server):
        waiting = asyncio.create_task(
            gateway.reserve(team, "m", prompt_tokens=PROMPT, max_output_tokens=OUTPUT)
        )
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await asyncio.sleep(0.2)  # Redis runs the stalled reservation now
    await gateway.send_pending()
    assert await shared(redis_server) == (USED, 0)
    await serve(gateway, team)  # its concurrency slot is free again


async def test_what_cannot_be_sent_at_shutdown_is_logged_with_its_total(
    make_gateway: GatewayFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway("open")
    team = principal(rpm=100)
    redis_server.stop()
    for _ in range(2):
        await serve(gateway, team)
    with caplog.at_level(logging.ERROR, logger="sluice.gateway.service"):
        await gateway.close()
    assert "2 settlement(s) totalling 30 tokens" in caplog.text
