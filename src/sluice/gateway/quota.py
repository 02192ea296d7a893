"""Quota: per-key rate limits and budgets as reservations, and the store seam they share.

Rate limits are token buckets, one for requests and one for tokens per key. A bucket holds
up to the per-minute limit and refills at limit/60 per second, so a burst of many concurrent
requests against a limit of N admits exactly N, and the limit is a rolling minute rather
than a calendar one. A request reserves `prompt + max_tokens * n` tokens at admission;
settlement refunds what it did not use.

Budgets (tokens and USD) use calendar windows in UTC: the hour, the day, or the month that
`now` falls in. A reservation is refused when spend in the window plus every outstanding
reservation plus this one would pass the budget. Spend is recorded for all three windows,
so `usage` can report each whatever the key's policy says.

`QuotaStore` is the seam: `LocalQuota` (store_local.py) keeps buckets and reservations in
memory and spend in a `SpendLedger` (SQLite); `RedisQuota` (store_redis.py) does each
check-and-reserve as one Lua script, so replicas sharing a Redis enforce one limit. Both
follow the functions here; tests hold them to the same cases.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from sluice.errors import QuotaExceeded, RateLimitExceeded
from sluice.gateway.keys import KeyPolicy, Window

Clock = Callable[[], float]
WINDOWS: tuple[Window, ...] = ("hour", "day", "month")
# A reservation a crashed replica never settled stops counting after this long.
RESERVATION_GRACE_S = 60.0


def closes_at(now: float, ttl_s: float) -> float:
    """When a reservation made or settled at `now` for a request limited to `ttl_s` stops
    mattering: it expires then, and the store forgets that it was settled (store_redis.py)."""
    return now + ttl_s + RESERVATION_GRACE_S


@dataclass(frozen=True)
class Limits:
    """The quota part of a key's policy."""

    rpm: int | None = None
    tpm: int | None = None
    budget_tokens: int | None = None
    budget_tokens_window: Window = "month"
    budget_usd: float | None = None
    budget_usd_window: Window = "month"
    max_concurrent: int | None = None  # live reservations at once

    @classmethod
    def of(cls, policy: KeyPolicy) -> Limits:
        return cls(
            max_concurrent=policy.max_concurrent,
            rpm=policy.rpm,
            tpm=policy.tpm,
            budget_tokens=policy.budget_tokens,
            budget_tokens_window=policy.budget_tokens_window,
            budget_usd=policy.budget_usd,
            budget_usd_window=policy.budget_usd_window,
        )


@dataclass(frozen=True)
class Demand:
    """What one request reserves: one request, its worst-case tokens and their price."""

    key: str
    tokens: int
    usd: float
    ttl_s: float  # the request's time limit; the reservation expires after it plus a grace


@dataclass(frozen=True)
class RateView:
    """One bucket after a decision, for the `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True)
class BudgetLeft:
    """What a key's budgets have left in their windows once a reservation is made (spend plus
    every outstanding reservation counted); None for a budget the key does not have."""

    tokens: float | None = None
    usd: float | None = None

    @classmethod
    def of(cls, limits: Limits, tokens: str, usd: str) -> BudgetLeft:
        """From the store's reply fields (`none` where there is no budget)."""
        return cls(
            float(tokens) if limits.budget_tokens is not None and tokens != "none" else None,
            float(usd) if limits.budget_usd is not None and usd != "none" else None,
        )


@dataclass(frozen=True)
class Grant:
    """An admitted reservation; settle it exactly once."""

    reservation_id: str
    key: str
    tokens: int
    usd: float
    requests: RateView | None = None
    token_view: RateView | None = None
    local: bool = False  # reserved in the fail-open fallback, not the shared store
    ttl_s: float = 0.0  # the request's time limit, as in its `Demand`
    budget_left: BudgetLeft = BudgetLeft()


@dataclass(frozen=True)
class Settlement:
    """What one request used, to replace its reservation: `tokens` and `usd` spent, counted
    in the calendar windows that hold `at` (epoch seconds, when the request ended)."""

    grant: Grant
    tokens: int
    usd: float
    at: float
    limits: Limits | None = None  # the key's, for budget alerts (gateway/alerts.py)


# Spend after a settlement, by spend field (`day:1763683200`): (tokens, usd) in that window.
Spent = dict[str, tuple[int, float]]


@dataclass(frozen=True)
class WindowUsage:
    window: Window
    start: float
    end: float
    tokens: int
    usd: float


@dataclass(frozen=True)
class Usage:
    """Spend of one key in the current hour, day and month, and what is reserved now."""

    key: str
    windows: tuple[WindowUsage, ...]
    reserved_tokens: int = 0
    reserved_usd: float = 0.0


class QuotaStore(Protocol):
    """Reserve, settle and report; every `reserve` is atomic against concurrent callers."""

    async def reserve(self, limits: Limits, demand: Demand, reservation_id: str) -> Grant:
        """Take the demand from the key's buckets and budgets, or raise `RateLimitExceeded` /
        `QuotaExceeded` and take nothing."""
        ...

    async def settle(self, grant: Grant, tokens: int, usd: float, at: float | None = None) -> Spent:
        """Replace the reservation by what was used: refund tokens, record spend. A settlement
        whose reservation is not in the store (it expired, or the fail-open fallback made it)
        records its spend all the same. `RedisQuota` counts a settlement sent twice once (the
        gateway replays those whose first attempt failed); `LocalQuota` never fails one.
        Spend counts in the windows that hold `at` (default: now). Returns each window's spend
        after it (empty when nothing was added, or the settlement was a repeat)."""
        ...

    async def settle_many(self, settlements: list[Settlement]) -> list[Spent]:
        """`settle` each, in one round trip where the store allows; all or none may fail."""
        ...

    async def usage(self, key: str) -> Usage: ...

    async def close(self) -> None: ...


# -- token buckets -------------------------------------------------------------------------


def refilled(level: float, updated: float, now: float, capacity: int) -> float:
    """A bucket's level at `now`: it refills `capacity` per minute, up to `capacity`."""
    return min(float(capacity), level + max(0.0, now - updated) * capacity / 60.0)


def view(level: float, capacity: int) -> RateView:
    return RateView(
        limit=capacity,
        remaining=max(0, math.floor(level)),
        reset_s=max(0.0, (capacity - level) * 60.0 / capacity),
    )


def wait_for(level: float, wanted: float, capacity: int) -> float:
    """Seconds until a bucket at `level` holds `wanted`."""
    return max(0.0, (wanted - level) * 60.0 / capacity)


# -- calendar windows ----------------------------------------------------------------------


def usd_slack(budget: float) -> float:
    """How far past a USD budget's exact left-over a request may reach: the rounding of
    the float sums spend is kept in (a $1 budget spent $0.10 at a time has
    0.09999999999999998 left before its tenth request, which must be served). A nano-dollar
    plus 10^-12 of the budget; the Redis script uses the same figures."""
    return 1e-9 + budget * 1e-12


def window_bounds(window: Window, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds, UTC) of the calendar window holding `now`."""
    if window == "hour":
        start = now - now % 3600
        return start, start + 3600
    if window == "day":
        start = now - now % 86400
        return start, start + 86400
    moment = datetime.fromtimestamp(now, UTC)
    first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    days = calendar.monthrange(moment.year, moment.month)[1]
    start = first.timestamp()
    return start, start + days * 86400


def spend_field(window: Window, now: float) -> str:
    """The name a ledger stores one window's spend under, e.g. `day:1763683200`."""
    return f"{window}:{int(window_bounds(window, now)[0])}"


# -- refusals ------------------------------------------------------------------------------

RefusalKind = Literal["concurrency", "requests", "tokens", "budget_tokens", "budget_usd"]
# How soon a key at its concurrency cap may try again: requests end at any moment.
CONCURRENCY_RETRY_S = 1.0


def rate_headers(requests: RateView | None, tokens: RateView | None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the buckets a key has."""
    headers: dict[str, str] = {}
    for kind, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset_s)
    return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `1.5s`, `6m0s` (rounded first, so 59.999 is `1m0s`)."""
    if seconds < 1 and math.ceil(seconds * 1000) < 1000:
        return f"{math.ceil(seconds * 1000)}ms"
    rounded = round(seconds, 2)
    if rounded < 60:
        return f"{rounded:g}s"
    minutes, rest = divmod(rounded, 60)
    return f"{int(minutes)}m{round(rest, 2):g}s"


@dataclass(frozen=True)
class Refusal:
    """Why a store refused, in a form every store can produce (Lua returns these fields)."""

    kind: RefusalKind
    retry_after_s: float
    requests: RateView | None = None
    tokens: RateView | None = None
    need: float = 0
    have: float = 0

    def error(self, limits: Limits, key: str) -> RateLimitExceeded | QuotaExceeded:
        headers = rate_headers(self.requests, self.tokens)
        if self.kind == "concurrency":
            return RateLimitExceeded(
                f"Too many concurrent requests for key '{key}': limit {limits.max_concurrent} "
                f"in flight. Retry after {duration(self.retry_after_s)}.",
                retry_after_s=self.retry_after_s,
                headers=headers,
                error_type="requests",
                code="concurrency_limit_exceeded",
            )
        if self.kind == "requests":
            return RateLimitExceeded(
                f"Rate limit reached for key '{key}' on requests per minute: limit "
                f"{limits.rpm}. Retry after {duration(self.retry_after_s)}.",
                retry_after_s=self.retry_after_s,
                headers=headers,
                error_type="requests",
            )
        if self.kind == "tokens":
            if self.need > (limits.tpm or 0):
                detail = (
                    f"this request needs {int(self.need)} tokens (prompt plus max_tokens * n), "
                    "more than the limit allows at once; lower max_tokens"
                )
            else:
                detail = f"{int(self.have)} available, {int(self.need)} requested"
            return RateLimitExceeded(
                f"Rate limit reached for key '{key}' on tokens per minute: limit "
                f"{limits.tpm}, {detail}. Retry after {duration(self.retry_after_s)}.",
                retry_after_s=self.retry_after_s,
                headers=headers,
                error_type="tokens",
            )
        unit, budget, window = (
            ("tokens", f"{limits.budget_tokens}", limits.budget_tokens_window)
            if self.kind == "budget_tokens"
            else ("USD", f"{limits.budget_usd:g}", limits.budget_usd_window)
        )
        have = f"{self.have:.6g}"
        return QuotaExceeded(
            f"Key '{key}' has exceeded its {unit} budget for this {window} ({budget} {unit}; "
            f"{have} left, this request may use {self.need:.6g}). Lower max_tokens or wait "
            f"for the next {window} (UTC).",
            retry_after_s=self.retry_after_s,
            headers=headers,
        )


@dataclass
class Bucket:
    level: float
    updated: float


@dataclass
class KeyState:
    """One key's in-memory quota state (LocalQuota)."""

    requests: Bucket | None = None
    tokens: Bucket | None = None
    reservations: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def purge(self, now: float) -> None:
        for rid, (_, _, expires) in list(self.reservations.items()):
            if expires <= now:
                del self.reservations[rid]

    @property
    def reserved(self) -> tuple[int, float]:
        return (
            sum(t for t, _, _ in self.reservations.values()),
            sum(u for _, u, _ in self.reservations.values()),
        )


def bucket_at(bucket: Bucket | None, capacity: int, now: float) -> Bucket:
    """`bucket` refilled to `now`, or a full new one (limits lowered since: capped)."""
    if bucket is None:
        return Bucket(float(capacity), now)
    return Bucket(refilled(bucket.level, bucket.updated, now, capacity), now)


def wall_clock() -> float:
    return time.time()
