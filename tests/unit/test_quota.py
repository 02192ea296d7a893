"""Quota: bucket and window arithmetic, and the behaviour every `QuotaStore` must share.

`QuotaContract` holds the store cases; `TestLocalQuota` runs them on `LocalQuota` here and
`tests/unit/test_store_redis.py` runs the same cases on `RedisQuota`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from itertools import count

import pytest

from sluice.errors import QuotaExceeded, RateLimitExceeded, error_body, error_response
from sluice.gateway.quota import (
    RESERVATION_GRACE_S,
    BudgetLeft,
    Demand,
    Grant,
    Limits,
    QuotaStore,
    RateView,
    duration,
    rate_headers,
    refilled,
    spend_field,
    view,
    wait_for,
    window_bounds,
)
from sluice.gateway.store_local import LocalQuota, MemoryLedger
from tests.conftest import START, FakeClock

KEY = "team-a"
_ids = count()


def at(text: str) -> float:
    """Epoch seconds of an ISO time in UTC, e.g. `at("2026-02-28T23:59:59")`."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def demand(tokens: int = 10, usd: float = 0.0, key: str = KEY, ttl_s: float = 30.0) -> Demand:
    return Demand(key=key, tokens=tokens, usd=usd, ttl_s=ttl_s)


def rid() -> str:
    return f"r{next(_ids)}"


# -- token buckets -------------------------------------------------------------------------


def test_refilled_adds_capacity_per_minute() -> None:
    assert refilled(0.0, 100.0, 115.0, 60) == pytest.approx(15.0)
    assert refilled(2.0, 100.0, 106.0, 30) == pytest.approx(5.0)


def test_refilled_is_capped_at_capacity() -> None:
    assert refilled(50.0, 0.0, 1000.0, 60) == 60.0
    assert refilled(-5.0, 0.0, 10_000.0, 7) == 7.0


def test_refilled_ignores_a_clock_that_went_back() -> None:
    assert refilled(10.0, 100.0, 90.0, 60) == 10.0


def test_view_floors_remaining_and_times_the_refill() -> None:
    bucket = view(2.7, 10)
    assert (bucket.limit, bucket.remaining) == (10, 2)
    assert bucket.reset_s == pytest.approx(43.8)
    assert view(10.0, 10) == RateView(limit=10, remaining=10, reset_s=0.0)


def test_view_of_an_overdrawn_bucket() -> None:
    bucket = view(-3.0, 10)
    assert bucket.remaining == 0
    assert bucket.reset_s == pytest.approx(78.0)


def test_wait_for() -> None:
    assert wait_for(0.5, 1, 60) == pytest.approx(0.5)
    assert wait_for(40.0, 60, 100) == pytest.approx(12.0)
    assert wait_for(5.0, 3, 60) == 0.0


# -- durations and headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (0.0004, "1ms"),
        (0.0, "0ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (12.345, "12.35s"),
        (59.5, "59.5s"),
        (60.0, "1m0s"),
        (61.25, "1m1.25s"),
        (360.0, "6m0s"),
        (3599.0, "59m59s"),
        # rounding carries into the next unit
        (0.9999, "1s"),
        (59.999, "1m0s"),
        (119.999, "2m0s"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_rate_headers_for_both_buckets() -> None:
    headers = rate_headers(RateView(60, 59, 1.0), RateView(1000, 250, 45.0))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "250",
        "x-ratelimit-reset-tokens": "45s",
    }


def test_rate_headers_only_for_buckets_the_key_has() -> None:
    assert rate_headers(None, None) == {}
    assert set(rate_headers(None, RateView(10, 0, 360.0))) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
    assert rate_headers(None, RateView(10, 0, 360.0))["x-ratelimit-reset-tokens"] == "6m0s"


# -- calendar windows ----------------------------------------------------------------------


def test_hour_window() -> None:
    assert window_bounds("hour", at("2026-03-10T12:34:56")) == (
        at("2026-03-10T12:00:00"),
        at("2026-03-10T13:00:00"),
    )


def test_day_window() -> None:
    assert window_bounds("day", at("2026-03-10T23:59:59")) == (
        at("2026-03-10T00:00:00"),
        at("2026-03-11T00:00:00"),
    )


def test_a_window_starts_at_its_first_second() -> None:
    assert window_bounds("hour", at("2026-03-10T13:00:00"))[0] == at("2026-03-10T13:00:00")
    assert window_bounds("day", at("2026-03-11T00:00:00"))[0] == at("2026-03-11T00:00:00")


@pytest.mark.parametrize(
    ("moment", "start", "end"),
    [
        ("2026-02-28T23:59:59", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
        ("2026-03-01T00:00:00", "2026-03-01T00:00:00", "2026-04-01T00:00:00"),
        ("2028-02-15T08:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),  # leap year
        ("2028-02-29T23:59:59", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
        ("2026-04-30T12:00:00", "2026-04-01T00:00:00", "2026-05-01T00:00:00"),
        ("2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ],
)
def test_month_window(moment: str, start: str, end: str) -> None:
    assert window_bounds("month", at(moment)) == (at(start), at(end))


def test_leap_february_has_29_days() -> None:
    start, end = window_bounds("month", at("2028-02-10T00:00:00"))
    assert end - start == 29 * 86400


def test_spend_field_names_the_window_start() -> None:
    now = at("2026-03-10T12:34:56")
    assert spend_field("hour", now) == f"hour:{int(at('2026-03-10T12:00:00'))}"
    assert spend_field("day", now) == f"day:{int(at('2026-03-10T00:00:00'))}"
    assert spend_field("month", now) == f"month:{int(at('2026-03-01T00:00:00'))}"
    assert spend_field("day", now) == spend_field("day", at("2026-03-10T00:00:00"))
    assert spend_field("day", now) != spend_field("day", at("2026-03-11T00:00:00"))


# -- the store contract --------------------------------------------------------------------


class QuotaContract:
    """Cases every `QuotaStore` passes; a subclass provides the `quota` fixture on `clock`."""

    async def test_rpm_admits_exactly_n_then_refuses(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(rpm=4)
        for i in range(4):
            grant = await quota.reserve(limits, demand(), rid())
            assert grant.requests is not None
            assert grant.requests.limit == 4
            assert grant.requests.remaining == 3 - i
            assert grant.requests.reset_s == pytest.approx(15.0 * (i + 1))
            assert grant.token_view is None
        with pytest.raises(RateLimitExceeded) as info:
            await quota.reserve(limits, demand(), rid())
        error = info.value
        assert error.retry_after_s == pytest.approx(60 / 4)
        assert error.headers == {
            "x-ratelimit-limit-requests": "4",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1m0s",
        }
        assert error.error_type == "requests"
        assert error_body(error)["error"]["code"] == "rate_limit_exceeded"
        assert f"'{KEY}'" in error.message and "requests per minute" in error.message
        response = error_response(error)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "15"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"

    async def test_requests_refill_over_time(self, quota: QuotaStore, clock: FakeClock) -> None:
        limits = Limits(rpm=4)  # one request back every 15 s
        for _ in range(4):
            await quota.reserve(limits, demand(), rid())
        clock.advance(7.5)
        with pytest.raises(RateLimitExceeded) as info:
            await quota.reserve(limits, demand(), rid())
        assert info.value.retry_after_s == pytest.approx(7.5)
        clock.advance(7.5)
        grant = await quota.reserve(limits, demand(), rid())
        assert grant.requests is not None and grant.requests.remaining == 0
        with pytest.raises(RateLimitExceeded):
            await quota.reserve(limits, demand(), rid())
        clock.advance(600)  # a long pause refills to the limit, never beyond it
        for _ in range(4):
            await quota.reserve(limits, demand(), rid())
        with pytest.raises(RateLimitExceeded):
            await quota.reserve(limits, demand(), rid())

    async def test_a_refusal_takes_nothing(self, quota: QuotaStore, clock: FakeClock) -> None:
        limits = Limits(rpm=2, tpm=100, budget_tokens=50, budget_tokens_window="day")
        for _ in range(5):
            with pytest.raises(QuotaExceeded):
                await quota.reserve(limits, demand(tokens=60), rid())
        first = await quota.reserve(limits, demand(tokens=25), rid())
        second = await quota.reserve(limits, demand(tokens=25), rid())
        assert first.requests is not None and first.requests.remaining == 1
        assert second.token_view is not None and second.token_view.remaining == 50

    async def test_keys_have_separate_limits(self, quota: QuotaStore, clock: FakeClock) -> None:
        limits = Limits(rpm=1)
        await quota.reserve(limits, demand(key="a"), rid())
        with pytest.raises(RateLimitExceeded):
            await quota.reserve(limits, demand(key="a"), rid())
        await quota.reserve(limits, demand(key="b"), rid())

    async def test_tpm_reserves_and_settlement_refunds(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(tpm=100)
        first = await quota.reserve(limits, demand(tokens=60), rid())
        assert first.tokens == 60
        assert first.token_view is not None and first.token_view.remaining == 40
        with pytest.raises(RateLimitExceeded) as info:
            await quota.reserve(limits, demand(tokens=60), rid())
        error = info.value
        assert error.error_type == "tokens"
        assert error.retry_after_s == pytest.approx(12.0)  # 20 tokens at 100/min
        assert "40 available, 60 requested" in error.message
        assert error.headers["x-ratelimit-remaining-tokens"] == "40"
        assert error.headers["x-ratelimit-limit-tokens"] == "100"
        await quota.settle(first, tokens=10, usd=0.0)  # 50 of the 60 come back
        second = await quota.reserve(limits, demand(tokens=60), rid())
        assert second.token_view is not None and second.token_view.remaining == 30

    async def test_settling_everything_refunds_nothing(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(tpm=100)
        grant = await quota.reserve(limits, demand(tokens=60), rid())
        await quota.settle(grant, tokens=60, usd=0.0)
        with pytest.raises(RateLimitExceeded):
            await quota.reserve(limits, demand(tokens=41), rid())
        await quota.reserve(limits, demand(tokens=40), rid())

    async def test_demand_over_the_tpm_limit_is_refused_for_a_minute(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(tpm=100)
        with pytest.raises(RateLimitExceeded) as info:
            await quota.reserve(limits, demand(tokens=101), rid())
        assert info.value.retry_after_s == 60
        assert "lower max_tokens" in info.value.message
        assert "101" in info.value.message
        await quota.reserve(limits, demand(tokens=100), rid())  # the full bucket was untouched

    async def test_token_budget_counts_spend_and_reservations(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(budget_tokens=100, budget_tokens_window="hour")
        clock.advance(600)  # 12:10, 50 minutes before the window ends
        first = await quota.reserve(limits, demand(tokens=60), rid())
        with pytest.raises(QuotaExceeded) as info:
            await quota.reserve(limits, demand(tokens=41), rid())
        error = info.value
        body = error_body(error)["error"]
        assert body["type"] == "insufficient_quota"
        assert body["code"] == "insufficient_quota"
        assert error_response(error).status_code == 429
        assert error.retry_after_s == pytest.approx(3000.0)
        assert "tokens budget for this hour" in error.message
        assert "40 left" in error.message
        second = await quota.reserve(limits, demand(tokens=40), rid())  # exactly the budget
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
        await quota.settle(first, tokens=30, usd=0.0)
        await quota.settle(second, tokens=40, usd=0.0)
        third = await quota.reserve(limits, demand(tokens=30), rid())  # 70 spent
        await quota.settle(third, tokens=30, usd=0.0)
        with pytest.raises(QuotaExceeded) as info:
            await quota.reserve(limits, demand(tokens=1), rid())
        assert "0 left" in info.value.message
        clock.advance(3000)  # 13:00: a new hour
        await quota.reserve(limits, demand(tokens=100), rid())

    async def test_usd_budget_per_day(self, quota: QuotaStore, clock: FakeClock) -> None:
        limits = Limits(budget_usd=1.0, budget_usd_window="day")
        first = await quota.reserve(limits, demand(usd=0.4), rid())
        second = await quota.reserve(limits, demand(usd=0.4), rid())
        with pytest.raises(QuotaExceeded) as info:
            await quota.reserve(limits, demand(usd=0.4), rid())
        error = info.value
        assert error_body(error)["error"]["type"] == "insufficient_quota"
        assert "USD budget for this day" in error.message
        assert error.retry_after_s == pytest.approx(12 * 3600.0)  # until midnight UTC
        await quota.settle(first, tokens=10, usd=0.5)
        await quota.settle(second, tokens=10, usd=0.5)
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(usd=0.01), rid())
        clock.advance(12 * 3600 - 1)
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(usd=0.01), rid())
        clock.advance(1)
        await quota.reserve(limits, demand(usd=0.99), rid())

    async def test_tiny_usd_amounts_add_up(self, quota: QuotaStore, clock: FakeClock) -> None:
        # Real prices are fractions of a cent per request (repr gives e.g. '2.5e-05').
        limits = Limits(budget_usd=1e-4, budget_usd_window="day")
        for _ in range(3):
            grant = await quota.reserve(limits, demand(usd=2.5e-05), rid())
            await quota.settle(grant, tokens=10, usd=2.5e-05)
        usage = await quota.usage(KEY)
        assert usage.windows[1].usd == pytest.approx(7.5e-05)
        await quota.reserve(limits, demand(usd=2e-05), rid())
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(usd=1e-05), rid())

    async def test_month_budget_rolls_over_at_the_month_end(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        clock.now = at("2026-02-28T23:59:00")
        limits = Limits(budget_tokens=50)  # month is the default window
        grant = await quota.reserve(limits, demand(tokens=50), rid())
        await quota.settle(grant, tokens=50, usd=0.0)
        with pytest.raises(QuotaExceeded) as info:
            await quota.reserve(limits, demand(tokens=1), rid())
        assert info.value.retry_after_s == pytest.approx(60.0)
        assert "month" in info.value.message
        clock.advance(60)  # 2026-03-01T00:00:00
        await quota.reserve(limits, demand(tokens=50), rid())
        usage = await quota.usage(KEY)
        month = usage.windows[2]
        assert (month.window, month.start, month.tokens) == ("month", clock.now, 0)

    async def test_unsettled_reservations_expire(self, quota: QuotaStore, clock: FakeClock) -> None:
        limits = Limits(budget_tokens=100, budget_tokens_window="day")
        await quota.reserve(limits, demand(tokens=100, usd=0.5, ttl_s=30.0), rid())
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
        clock.advance(31.0)  # past the request's time limit, within the grace
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
        clock.advance(RESERVATION_GRACE_S - 1.5)
        with pytest.raises(QuotaExceeded):
            await quota.reserve(limits, demand(tokens=1), rid())
        usage = await quota.usage(KEY)
        assert (usage.reserved_tokens, usage.reserved_usd) == (100, 0.5)
        clock.advance(1.0)
        usage = await quota.usage(KEY)
        assert (usage.reserved_tokens, usage.reserved_usd) == (0, 0.0)
        await quota.reserve(limits, demand(tokens=100, ttl_s=30.0), rid())

    async def test_reservations_expire_exactly_at_ttl_plus_grace(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(budget_tokens=100, budget_tokens_window="day")
        await quota.reserve(limits, demand(tokens=100, ttl_s=30.0), rid())
        clock.advance(30.0 + RESERVATION_GRACE_S)
        usage = await quota.usage(KEY)
        assert usage.reserved_tokens == 0
        await quota.reserve(limits, demand(tokens=100), rid())

    async def test_usage_reports_spend_per_window_and_reservations(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        empty = await quota.usage(KEY)
        assert [(w.window, w.tokens, w.usd) for w in empty.windows] == [
            ("hour", 0, 0.0),
            ("day", 0, 0.0),
            ("month", 0, 0.0),
        ]
        assert (empty.reserved_tokens, empty.reserved_usd) == (0, 0.0)
        grant = await quota.reserve(Limits(), demand(tokens=50, usd=0.5), rid())
        await quota.settle(grant, tokens=30, usd=0.25)
        await quota.reserve(Limits(), demand(tokens=20, usd=0.125), rid())
        await quota.reserve(Limits(), demand(key="other", tokens=7), rid())
        usage = await quota.usage(KEY)
        assert usage.key == KEY
        assert [(w.window, w.start, w.end, w.tokens, w.usd) for w in usage.windows] == [
            ("hour", START, START + 3600, 30, 0.25),
            ("day", START - 12 * 3600, START + 12 * 3600, 30, 0.25),
            ("month", at("2026-03-01T00:00:00"), at("2026-04-01T00:00:00"), 30, 0.25),
        ]
        assert (usage.reserved_tokens, usage.reserved_usd) == (20, 0.125)
        clock.advance(3600)  # the next hour: its spend starts again, the day's does not
        later = await quota.usage(KEY)
        assert [(w.window, w.tokens) for w in later.windows] == [
            ("hour", 0),
            ("day", 30),
            ("month", 30),
        ]

    async def test_concurrent_reservations_admit_exactly_the_rpm(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(rpm=37)
        results = await asyncio.gather(
            *(quota.reserve(limits, demand(), rid()) for _ in range(200)),
            return_exceptions=True,
        )
        admitted = [r for r in results if isinstance(r, Grant)]
        refused = [r for r in results if isinstance(r, RateLimitExceeded)]
        assert (len(admitted), len(refused)) == (37, 163)
        assert len({g.reservation_id for g in admitted}) == 37

    async def test_max_concurrent_caps_requests_in_flight(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(max_concurrent=3, rpm=100)
        results = await asyncio.gather(
            *(quota.reserve(limits, demand(), rid()) for _ in range(10)),
            return_exceptions=True,
        )
        admitted = [r for r in results if isinstance(r, Grant)]
        refused = [r for r in results if isinstance(r, RateLimitExceeded)]
        assert (len(admitted), len(refused)) == (3, 7)
        assert refused[0].code == "concurrency_limit_exceeded"
        assert refused[0].retry_after_s == 1.0 and "limit 3 in flight" in refused[0].message
        second = await quota.reserve(Limits(rpm=100), demand(), rid())  # refusals took nothing
        assert second.requests is not None and second.requests.remaining == 100 - 3 - 1
        await quota.settle(second, tokens=10, usd=0.0)
        await quota.settle(admitted[0], tokens=10, usd=0.0)  # one ends: one more may start
        assert isinstance(await quota.reserve(limits, demand(), rid()), Grant)
        with pytest.raises(RateLimitExceeded):
            await quota.reserve(limits, demand(), rid())
        clock.advance(30.0 + RESERVATION_GRACE_S)  # a crashed replica's requests stop counting
        assert isinstance(await quota.reserve(limits, demand(), rid()), Grant)

    async def test_a_grant_says_what_each_budget_has_left(
        self, quota: QuotaStore, clock: FakeClock
    ) -> None:
        limits = Limits(budget_tokens=1000, budget_usd=2.0)
        first = await quota.reserve(limits, demand(tokens=100, usd=0.5), rid())
        assert first.budget_left == BudgetLeft(900, 1.5)
        await quota.settle(first, tokens=40, usd=0.25)
        second = await quota.reserve(limits, demand(tokens=10, usd=0.0), rid())
        assert second.budget_left == BudgetLeft(950, 1.75)
        plain = await quota.reserve(Limits(rpm=5), demand(), rid())
        assert plain.budget_left == BudgetLeft(None, None)

    @pytest.mark.parametrize(("budget", "price"), [(1.0, 0.1), (0.3, 0.1), (10.0, 0.7)])
    async def test_a_usd_budget_serves_exactly_what_it_pays_for(
        self, quota: QuotaStore, clock: FakeClock, budget: float, price: float
    ) -> None:
        """Float sums of spend must not cost a request: a $1 budget at $0.10 a request
        serves 10 (0.1 * 9 left 0.09999999999999998, which refused the tenth)."""
        limits = Limits(budget_usd=budget)
        served = 0
        for _ in range(100):
            try:
                grant = await quota.reserve(limits, demand(tokens=1, usd=price), rid())
            except QuotaExceeded:
                break
            await quota.settle(grant, tokens=1, usd=price)
            served += 1
        assert served == int(budget / price + 1e-9)  # 10, 3 and 14 requests


class TestLocalQuota(QuotaContract):
    @pytest.fixture
    def quota(self, clock: FakeClock) -> LocalQuota:
        return LocalQuota(MemoryLedger(), clock=clock)
