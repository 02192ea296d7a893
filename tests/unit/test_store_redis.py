"""The shared store on a real `redis-server`: the quota and key store cases every store
passes, plus what only a shared store has to get right (several replicas, restarts, outages).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis

from sluice.errors import QuotaExceeded, RateLimitExceeded
from sluice.gateway.quota import RESERVATION_GRACE_S, Grant, Limits, RateView, Settlement
from sluice.gateway.store_redis import (
    MAX_CONNECTIONS,
    PREFIX,
    SPEND_FIELDS,
    RedisKeyStore,
    RedisQuota,
    RedisStore,
    StoreFailure,
)
from tests.conftest import FakeClock
from tests.redis_server import RedisServer
from tests.unit.test_quota import KEY, QuotaContract, demand, rid
from tests.unit.test_store_sqlite import KeyStoreContract, stored

TIMEOUT_S = 0.5


class TestRedisQuota(QuotaContract):
    @pytest.fixture
    async def quota(self, redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[RedisQuota]:
        quota = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
        yield quota
        await quota.close()


class TestRedisKeyStore(KeyStoreContract):
    @pytest.fixture
    async def keys(self, redis_server: RedisServer) -> AsyncIterator[RedisKeyStore]:
        store = RedisKeyStore(RedisStore(redis_server.url, TIMEOUT_S))
        yield store
        await store.close()


@pytest.fixture
async def replicas(
    redis_server: RedisServer, clock: FakeClock
) -> AsyncIterator[tuple[RedisQuota, RedisQuota]]:
    """Two quota stores with their own clients, like two sluice replicas on one Redis."""
    one = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
    two = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
    yield one, two
    await one.close()
    await two.close()


# -- several replicas ----------------------------------------------------------------------


async def test_replicas_share_one_rate_limit_exactly(
    replicas: tuple[RedisQuota, RedisQuota],
) -> None:
    one, two = replicas
    assert one.store.client is not two.store.client
    limits = Limits(rpm=50)
    calls = [q.reserve(limits, demand(), rid()) for _ in range(100) for q in (one, two)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    admitted = [r for r in results if isinstance(r, Grant)]
    refused = [r for r in results if isinstance(r, RateLimitExceeded)]
    assert (len(admitted), len(refused)) == (50, 150)


async def test_a_burst_bigger_than_the_connection_pool_waits_for_connections(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    # More concurrent calls than the pool has connections (store_redis.MAX_CONNECTIONS).
    quota = RedisQuota(RedisStore(redis_server.url, 1.0), clock=clock)
    try:
        limits = Limits(rpm=37)
        results = await asyncio.gather(
            *(quota.reserve(limits, demand(), rid()) for _ in range(MAX_CONNECTIONS + 50)),
            return_exceptions=True,
        )
        # the burst reused the pool's connections (each new one costs a connect and a
        # handshake: opened per call, a burst on a busy machine timed out)
        clients = await quota.store.client.info("clients")
        assert clients["connected_clients"] <= MAX_CONNECTIONS
    finally:
        await quota.close()
    kinds = {type(r).__name__ for r in results}
    assert kinds == {"Grant", "RateLimitExceeded"}
    assert sum(isinstance(r, Grant) for r in results) == 37


async def test_replicas_share_one_budget(
    replicas: tuple[RedisQuota, RedisQuota], clock: FakeClock
) -> None:
    one, two = replicas
    limits = Limits(budget_tokens=100, budget_usd=1.0)
    held = await one.reserve(limits, demand(tokens=60, usd=0.25), rid())
    with pytest.raises(QuotaExceeded):  # the other replica sees the reservation
        await two.reserve(limits, demand(tokens=41), rid())
    await one.settle(held, tokens=60, usd=0.75)
    with pytest.raises(QuotaExceeded) as info:  # ... and the spend
        await two.reserve(limits, demand(tokens=10, usd=0.5), rid())
    assert "USD budget" in info.value.message
    grant = await two.reserve(limits, demand(tokens=40, usd=0.25), rid())
    await two.settle(grant, tokens=40, usd=0.25)
    for quota in (one, two):
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
        usage = await quota.usage(KEY)
        assert (usage.windows[2].tokens, usage.windows[2].usd) == (100, 1.0)


async def test_replicas_whose_clocks_differ_still_share_one_rate_limit(
    redis_server: RedisServer,
) -> None:
    """Each replica stamps the buckets with its own clock: one 2 s behind must not move a
    bucket's stamp back, else every alternation between them refilled 2 s of the limit
    (600 of 600 requests were admitted here at 60 per minute)."""
    ahead, behind = FakeClock(), FakeClock()
    one = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=ahead)
    two = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=behind)
    start = ahead.now
    admitted = 0
    try:
        for step in range(600):  # 60 s, a request every 0.1 s, alternating replicas
            ahead.now = start + step * 0.1
            behind.now = ahead.now - 2.0
            quota = one if step % 2 == 0 else two
            try:
                await quota.reserve(Limits(rpm=60, tpm=600), demand(tokens=1), rid())
                admitted += 1
            except RateLimitExceeded:
                pass
    finally:
        await one.close()
        await two.close()
    assert 119 <= admitted <= 122  # the first minute's 60 plus 60 refilled over 60 s


# -- replays: each reservation id counts once ----------------------------------------------


async def test_a_settlement_sent_twice_counts_once(
    replicas: tuple[RedisQuota, RedisQuota], clock: FakeClock
) -> None:
    one, two = replicas
    limits = Limits(tpm=1000, budget_tokens=1000)
    grant = await one.reserve(limits, demand(tokens=100), rid())
    sent = Settlement(grant, 40, 0.5, clock())
    await one.settle_many([sent])
    await two.settle_many([sent, sent])  # a replay after an answer that never arrived
    usage = await two.usage(KEY)
    assert (usage.windows[2].tokens, usage.windows[2].usd, usage.reserved_tokens) == (40, 0.5, 0)
    later = await one.reserve(limits, demand(tokens=1), rid())
    assert later.token_view is not None and later.token_view.remaining == 1000 - 40 - 1


async def test_a_settlement_of_a_reservation_the_store_never_saw_counts_its_spend(
    replicas: tuple[RedisQuota, RedisQuota], clock: FakeClock
) -> None:
    """The fail-open fallback reserved it: the spend still lands, in the window it was
    served in, and a `RESERVE` of that id arriving late (a stalled Redis) takes nothing."""
    one, two = replicas
    limits = Limits(rpm=10, tpm=1000, budget_tokens=1000)
    fallback = Grant("served-locally", KEY, 100, 0.0, ttl_s=30.0)
    served_at = clock()
    clock.advance(3600)  # sent an hour later: counted in the hour it was served in
    await one.settle(fallback, tokens=60, usd=0.0, at=served_at)
    usage = await two.usage(KEY)
    assert [w.tokens for w in usage.windows] == [0, 60, 60]  # this hour, day, month
    with pytest.raises(StoreFailure, match="already closed"):
        await two.reserve(limits, demand(tokens=100), "served-locally")
    usage = await two.usage(KEY)
    assert usage.reserved_tokens == 0
    grant = await two.reserve(limits, demand(tokens=1), rid())
    assert grant.requests is not None and grant.requests.remaining == 9
    assert grant.token_view is not None and grant.token_view.remaining == 999


async def test_a_settlement_closes_a_reservation_the_store_made_late(
    replicas: tuple[RedisQuota, RedisQuota], clock: FakeClock
) -> None:
    one, two = replicas
    limits = Limits(tpm=1000, budget_tokens=1000)
    late = await one.reserve(limits, demand(tokens=100), "stalled")  # ran after a timeout
    closing = Grant("stalled", KEY, 100, 0.0, token_view=RateView(1000, 0, 0.0), ttl_s=30.0)
    await two.settle(closing, tokens=0, usd=0.0)
    usage = await one.usage(KEY)
    assert (usage.windows[2].tokens, usage.reserved_tokens) == (0, 0)
    assert late.token_view is not None
    grant = await one.reserve(limits, demand(tokens=1), rid())
    assert grant.token_view is not None and grant.token_view.remaining == 999  # refunded


async def test_closed_ids_are_forgotten_after_the_request_time_limit(
    redis_server: RedisServer, replicas: tuple[RedisQuota, RedisQuota], clock: FakeClock
) -> None:
    one, _ = replicas
    for _ in range(20):
        grant = await one.reserve(Limits(rpm=100), demand(ttl_s=30.0), rid())
        await one.settle(grant, tokens=5, usd=0.0)
    expiry = f"{PREFIX}{{{KEY}}}:resexp"
    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert raw.zcard(expiry) == 20
        clock.advance(30.0 + RESERVATION_GRACE_S + 1)
        await one.reserve(Limits(rpm=100), demand(), rid())
        assert raw.zcard(expiry) == 1  # only the new reservation
    finally:
        raw.close()


async def test_a_ledger_keeps_only_the_windows_that_are_read(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """Spend of windows that ended is read by nothing: a key settling every hour for two
    days keeps a bounded ledger (it grew by two fields an hour), and the windows that
    matter still hold their whole spend; one a replica with its clock ahead began stays."""
    quota = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
    ahead = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=lambda: clock() + 3600)
    try:
        for _ in range(48):
            grant = await quota.reserve(Limits(), demand(tokens=10, usd=0.5), rid())
            await quota.settle(grant, tokens=10, usd=0.5)
            clock.advance(3600)
        early = await ahead.reserve(Limits(), demand(tokens=1), rid())
        await ahead.settle(early, tokens=1, usd=0.0)
        grant = await quota.reserve(Limits(), demand(tokens=10, usd=0.5), rid())
        await quota.settle(grant, tokens=10, usd=0.5)
        fields = await quota.store.client.hkeys(f"sluice:{{{KEY}}}:spend")
        assert len(fields) <= SPEND_FIELDS + 6
        windows = {w.window: (w.tokens, w.usd) for w in (await quota.usage(KEY)).windows}
        # 12 hours of the last day, then the hour now and the 1 token begun an hour ahead
        assert windows == {"hour": (10, 0.5), "day": (131, 6.5), "month": (491, 24.5)}
        later = {w.window: w.tokens for w in (await ahead.usage(KEY)).windows}
        assert later["hour"] == 1  # the next hour's field, begun early, was kept
    finally:
        await quota.close()
        await ahead.close()


# -- restarts and outages ------------------------------------------------------------------


async def test_spend_survives_a_redis_restart(redis_server: RedisServer, clock: FakeClock) -> None:
    limits = Limits(budget_tokens=100)
    quota = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
    try:
        grant = await quota.reserve(limits, demand(tokens=100, usd=0.5), rid())
        await quota.settle(grant, tokens=100, usd=0.5)
    finally:
        await quota.close()
    redis_server.stop()
    redis_server.start()
    quota = RedisQuota(RedisStore(redis_server.url, TIMEOUT_S), clock=clock)
    try:
        usage = await quota.usage(KEY)
        assert [(w.tokens, w.usd) for w in usage.windows] == [(100, 0.5)] * 3
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
    finally:
        await quota.close()


async def test_keys_survive_a_redis_restart(redis_server: RedisServer) -> None:
    keys = RedisKeyStore(RedisStore(redis_server.url, TIMEOUT_S))
    key = stored("team-a")
    try:
        await keys.add(key)
    finally:
        await keys.close()
    redis_server.stop()
    redis_server.start()
    keys = RedisKeyStore(RedisStore(redis_server.url, TIMEOUT_S))
    try:
        assert await keys.find(key.secret_sha256) == key
        assert await keys.count_live() == 1
    finally:
        await keys.close()


async def test_a_stopped_server_fails_fast_and_the_client_recovers(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = RedisStore(redis_server.url, TIMEOUT_S)
    quota, keys = RedisQuota(store, clock=clock), RedisKeyStore(store)
    try:
        await quota.reserve(Limits(rpm=10), demand(), rid())  # connected and working
        redis_server.stop()
        for work in (
            quota.reserve(Limits(rpm=10), demand(), rid()),
            quota.usage(KEY),
            keys.count_live(),
        ):
            started = time.monotonic()
            with pytest.raises(StoreFailure, match="redis"):
                await asyncio.wait_for(work, 5.0)
            assert time.monotonic() - started < 4 * TIMEOUT_S + 0.5
        redis_server.start()
        grant = await quota.reserve(Limits(rpm=10), demand(), rid())  # reconnected by itself
        assert grant.requests is not None and grant.requests.remaining == 8
        assert await keys.count_live() == 0
    finally:
        await store.close()


async def test_a_frozen_server_times_out_instead_of_hanging(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = RedisStore(redis_server.url, TIMEOUT_S)
    quota = RedisQuota(store, clock=clock)
    try:
        await quota.reserve(Limits(rpm=10), demand(), rid())
        os.kill(redis_server.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            started = time.monotonic()
            with pytest.raises(StoreFailure):
                await asyncio.wait_for(quota.reserve(Limits(rpm=10), demand(), rid()), 5.0)
            assert time.monotonic() - started < 4 * TIMEOUT_S + 0.5
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        grant = await quota.reserve(Limits(rpm=10), demand(), rid())
        assert grant.requests is not None
    finally:
        await store.close()
