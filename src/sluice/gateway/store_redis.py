"""The shared store: keys, buckets, reservations and spend in Redis, for several replicas.

Each check-and-reserve is one Lua script (`RESERVE`), so replicas sharing one Redis enforce
one limit and one budget; settlement is another (`SETTLE`). The scripts follow quota.py's
functions line by line. Every key of one API key shares a hash tag (`{name}`), so the
scripts also run on Redis Cluster. Time comes from the caller (NTP-synced replicas), which
keeps tests on an injected clock; a bucket's stamp never moves back, so replicas whose clocks
differ by seconds still share one rate (a replica behind refills nothing until its clock
passes the stamp).

Reservation ids make both scripts safe to run late or twice. A call that timed out on the
client may still run when a stalled Redis resumes; the gateway then no longer waits for it
and later settles (or cancels, with zero use) the same id. The expiry set (`resexp`) keeps
every id the store has seen until it stops mattering (`quota.closes_at`): an id in it but not
in the reservations hash is closed, so a `SETTLE` sent twice counts once, and a `RESERVE`
that arrives after its id was closed takes nothing. (One that arrives even later, after the
request's time limit and the grace, carries a `now` so old that its reservation is purged by
the next call and its buckets refill at once.)

Calls are bounded: a socket timeout, one immediate retry, and an overall deadline. Any
Redis failure surfaces as `StoreFailure`; the gateway decides between failing open and
closed. redis-py reconnects by itself on the next call once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from sluice.errors import Conflict, StoreUnavailable
from sluice.gateway.keys import KeyExists, KeyPolicy, PolicyChange, StoredKey
from sluice.gateway.quota import (
    CONCURRENCY_RETRY_S,
    WINDOWS,
    BudgetLeft,
    Clock,
    Demand,
    Grant,
    Limits,
    Refusal,
    RefusalKind,
    Settlement,
    Spent,
    Usage,
    WindowUsage,
    closes_at,
    spend_field,
    view,
    wall_clock,
    window_bounds,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)
PREFIX = "sluice:"
# Connections per process. A burst waits for a pooled connection rather than opening one
# per call: a Redis call takes well under a millisecond on an open connection, while a new
# one costs a connect and a handshake. With 512, a burst of 200 reservations on a busy
# 2-core machine spent its deadline opening connections and 90 of them failed
# (StoreFailure); with 32 none did.
MAX_CONNECTIONS = 32
# Key changes (update, rotate) are retried when another writer got between (WATCH), after a
# random exponential pause (AWS's "full jitter"), so that admins changing one key at once
# all get through; past the last attempt the change is a 409 to retry.
WATCH_ATTEMPTS = 20
WATCH_BACKOFF_S = 0.005
WATCH_BACKOFF_MAX_S = 0.25

# KEYS: bucket hash, reservations hash, reservation expiry zset, spend hash.
# ARGV: now, rpm, tpm, tokens, usd, budget_tokens, tokens_field, budget_usd, usd_field,
#       reservation id, expires at, max concurrent. Limits of -1 mean "none".
# Returns {admitted, kind, retry_s, requests_level, tokens_level, need, have, tokens_left,
# usd_left} (as strings: Lua numbers become integers in replies; `none` where the key has no
# such budget; left counts this reservation); kind `closed` when the id is already closed.
RESERVE = """
local now = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local need, usd = tonumber(ARGV[4]), tonumber(ARGV[5])
local btok, busd = tonumber(ARGV[6]), tonumber(ARGV[8])
if redis.call('ZSCORE', KEYS[3], ARGV[10]) then
  return {0, 'closed', '0', '-1', '-1', '0', '0', 'none', 'none'}
end
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
end
-- A bucket's stamp never goes back: a replica whose clock is behind another's refills
-- nothing and keeps the later stamp (else each alternation would refill the skew again).
local function level(name, cap)
  local l = tonumber(redis.call('HGET', KEYS[1], name .. 'l'))
  if l == nil then return cap, ARGV[1] end
  local stamp = redis.call('HGET', KEYS[1], name .. 't')
  local t = tonumber(stamp)
  if t < now then stamp = ARGV[1] end
  return math.min(cap, l + math.max(0, now - t) * cap / 60), stamp
end
local rq, tk, rstamp, kstamp = -1, -1, ARGV[1], ARGV[1]
if rpm > 0 then rq, rstamp = level('r', rpm) end
if tpm > 0 then tk, kstamp = level('k', tpm) end
local ltok, lusd = 'none', 'none'
local function reply(ok, kind, retry, n, h)
  return {ok, kind, tostring(retry), tostring(rq), tostring(tk), tostring(n), tostring(h),
          tostring(ltok), tostring(lusd)}
end
local maxc = tonumber(ARGV[12])
if maxc > 0 then
  local held = redis.call('HLEN', KEYS[2])
  if held >= maxc then return reply(0, 'concurrency', 1, 1, held) end
end
if rpm > 0 and rq < 1 then return reply(0, 'requests', (1 - rq) * 60 / rpm, 1, rq) end
if tpm > 0 and tk < need then
  local retry = 60
  if need <= tpm then retry = (need - tk) * 60 / tpm end
  return reply(0, 'tokens', retry, need, tk)
end
if btok >= 0 or busd >= 0 then
  local rt, ru = 0, 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
    local sep = string.find(v, ' ', 1, true)
    rt = rt + tonumber(string.sub(v, 1, sep - 1))
    ru = ru + tonumber(string.sub(v, sep + 1))
  end
  if btok >= 0 then
    local left = btok - tonumber(redis.call('HGET', KEYS[4], ARGV[7] .. ':t') or '0') - rt
    if need > left then return reply(0, 'budget_tokens', 0, need, left) end
    ltok = left - need
  end
  if busd >= 0 then
    local left = busd - tonumber(redis.call('HGET', KEYS[4], ARGV[9] .. ':u') or '0') - ru
    -- within float rounding of the sums (quota.py's usd_slack)
    if usd > left + 1e-9 + busd * 1e-12 then return reply(0, 'budget_usd', 0, usd, left) end
    lusd = left - usd
  end
end
if rpm > 0 then
  rq = rq - 1
  redis.call('HSET', KEYS[1], 'rl', tostring(rq), 'rt', rstamp)
end
if tpm > 0 then
  tk = tk - need
  redis.call('HSET', KEYS[1], 'kl', tostring(tk), 'kt', kstamp)
end
if rpm > 0 or tpm > 0 then redis.call('EXPIRE', KEYS[1], 120) end
redis.call('HSET', KEYS[2], ARGV[10], ARGV[4] .. ' ' .. ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[11], ARGV[10])
return reply(1, 'ok', 0, need, 0)
"""

# Fields a spend ledger keeps before past windows are pruned: hour, day and month, tokens and
# USD each (6), plus as many again for windows a replica with a clock ahead has begun.
SPEND_FIELDS = 12
# KEYS: as RESERVE. ARGV: now, tpm (-1 none), refund, reservation id, tokens, usd, closed
# until, then the spend fields of the hour, day and month. Returns {0} when the id was already
# closed (nothing done), else {1, field, tokens, usd, ...}: each window's spend after it.
SETTLE = """
local now, tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HDEL', KEYS[2], ARGV[4])
if held == 0 and redis.call('ZSCORE', KEYS[3], ARGV[4]) then return {0} end
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[4])
if held == 1 and tpm > 0 then
  local l = tonumber(redis.call('HGET', KEYS[1], 'kl'))
  if l ~= nil then
    local stamp = redis.call('HGET', KEYS[1], 'kt')
    local t = tonumber(stamp)
    l = math.min(tpm, math.min(tpm, l + math.max(0, now - t) * tpm / 60) + refund)
    if t < now then stamp = ARGV[1] end  -- never back (RESERVE's `level`)
    redis.call('HSET', KEYS[1], 'kl', tostring(l), 'kt', stamp)
  end
end
local spent = {1}
if tonumber(ARGV[5]) > 0 or tonumber(ARGV[6]) > 0 then
  for i = 8, #ARGV do
    local t = redis.call('HINCRBY', KEYS[4], ARGV[i] .. ':t', ARGV[5])
    local u = redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i] .. ':u', ARGV[6])
    table.insert(spent, ARGV[i])
    table.insert(spent, tostring(t))
    table.insert(spent, u)
  end
  -- Past windows are read by nothing: once the ledger holds more than its current windows
  -- (and a few from replicas whose clocks differ), fields of windows that ended go.
  if redis.call('HLEN', KEYS[4]) > SPEND_FIELDS then
    local start = {}
    for i = 8, #ARGV do
      local window, from = string.match(ARGV[i], '^(%a+):(%d+)$')
      start[window] = tonumber(from)
    end
    for _, field in ipairs(redis.call('HKEYS', KEYS[4])) do
      local window, from = string.match(field, '^(%a+):(%d+):')
      if start[window] == nil or tonumber(from) < start[window] then
        redis.call('HDEL', KEYS[4], field)
      end
    end
  end
end
return spent
""".replace("SPEND_FIELDS", str(SPEND_FIELDS))

# KEYS: names hash, keys hash. ARGV: name, digest, body. Adds a key unless its name is live
# or its secret was ever used (a revoked secret never comes back).
ADD_KEY = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class StoreFailure(StoreUnavailable):
    """The store could not answer (Redis down, timed out, or refused).

    The gateway catches it to fail open or closed; anywhere else (the admin API) it is a 503
    `store_unavailable`. `detail` says what went wrong, for logs only."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "The server cannot reach its limits store. Retry shortly.", retry_after_s=5.0
        )
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client that fails fast: bounded socket timeouts and one immediate retry (a pooled
    connection that died with a Redis restart fails once, then a fresh one is made)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s * 4,  # waiting for a free connection is bounded too
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # closes the pool with it
    return client


class RedisStore:
    """Shared by the quota and key stores: the client, the scripts and one bounded `call`."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.client = connect(url, timeout_s)
        self.timeout_s = timeout_s
        self.reserve = self.client.register_script(RESERVE)
        self.settle = self.client.register_script(SETTLE)
        self.add_key = self.client.register_script(ADD_KEY)
        self._closed = False

    async def call(self, work: Awaitable[T]) -> T:
        """`work` under an overall deadline; every failure becomes `StoreFailure`."""
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                return await work
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreFailure(f"redis: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()


def _key_names(name: str) -> list[str]:
    base = f"{PREFIX}{{{name}}}"
    return [f"{base}:bucket", f"{base}:res", f"{base}:resexp", f"{base}:spend"]


def _spent(reply: list[Any]) -> Spent:
    """`SETTLE`'s reply as `Spent`."""
    values = [str(v) for v in reply[1:]]
    return {values[i]: (int(values[i + 1]), float(values[i + 2])) for i in range(0, len(values), 3)}


def _limit(value: float | None) -> str:
    return "-1" if value is None else repr(value)


class RedisQuota:
    """`QuotaStore` over Redis (see module docstring)."""

    def __init__(self, store: RedisStore, clock: Clock = wall_clock) -> None:
        self.store = store
        self.clock = clock

    async def reserve(self, limits: Limits, demand: Demand, reservation_id: str) -> Grant:
        now = self.clock()
        raw = await self.store.call(
            self.store.reserve(
                keys=_key_names(demand.key),
                args=[
                    repr(now),
                    str(limits.rpm or 0),
                    str(limits.tpm or 0),
                    str(demand.tokens),
                    repr(demand.usd),
                    _limit(limits.budget_tokens),
                    spend_field(limits.budget_tokens_window, now),
                    _limit(limits.budget_usd),
                    spend_field(limits.budget_usd_window, now),
                    reservation_id,
                    repr(closes_at(now, demand.ttl_s)),
                    str(limits.max_concurrent or -1),
                ],
            )
        )
        admitted, kind, retry, rq, tk, need, have, tokens_left, usd_left = (str(x) for x in raw)
        if kind == "closed":  # only a reused id can meet this
            raise StoreFailure(f"redis: reservation {reservation_id} was already closed")
        requests = view(float(rq), limits.rpm) if limits.rpm else None
        tokens = view(float(tk), limits.tpm) if limits.tpm else None
        if admitted == "1":
            return Grant(
                reservation_id,
                demand.key,
                demand.tokens,
                demand.usd,
                requests,
                tokens,
                ttl_s=demand.ttl_s,
                budget_left=BudgetLeft.of(limits, tokens_left, usd_left),
            )
        refusal_kind: RefusalKind = kind  # type: ignore[assignment]
        retry_s = float(retry)
        if refusal_kind == "concurrency":
            retry_s = CONCURRENCY_RETRY_S
        elif refusal_kind == "budget_tokens":
            retry_s = window_bounds(limits.budget_tokens_window, now)[1] - now
        elif refusal_kind == "budget_usd":
            retry_s = window_bounds(limits.budget_usd_window, now)[1] - now
        refusal = Refusal(
            refusal_kind, retry_s, requests, tokens, float(need), max(0.0, float(have))
        )
        raise refusal.error(limits, demand.key)

    def _settle(self, settlement: Settlement, client: Any = None) -> Awaitable[Any]:
        """The `SETTLE` call for `settlement` (on `client`, e.g. a pipeline, if given)."""
        now = self.clock()
        grant = settlement.grant
        tpm = grant.token_view.limit if grant.token_view is not None else -1
        return self.store.settle(
            keys=_key_names(grant.key),
            args=[
                repr(now),
                str(tpm),
                str(grant.tokens - settlement.tokens),
                grant.reservation_id,
                str(settlement.tokens),
                repr(settlement.usd),
                repr(closes_at(now, grant.ttl_s)),
                *(spend_field(w, settlement.at) for w in WINDOWS),
            ],
            client=client,
        )

    async def settle(self, grant: Grant, tokens: int, usd: float, at: float | None = None) -> Spent:
        settlement = Settlement(grant, tokens, usd, self.clock() if at is None else at)
        return _spent(await self.store.call(self._settle(settlement)))

    async def settle_many(self, settlements: list[Settlement]) -> list[Spent]:
        pipe: Any = self.store.client.pipeline(transaction=False)
        for settlement in settlements:
            await self._settle(settlement, pipe)  # queued on the pipeline, not sent
        # A reply Redis refused (a script error) drops that settlement, logged; it must not
        # hold up the rest. Connection trouble still raises (StoreFailure).
        replies = await self.store.call(pipe.execute(raise_on_error=False))
        spent: list[Spent] = []
        for settlement, reply in zip(settlements, replies, strict=True):
            if isinstance(reply, Exception):
                logger.error(
                    "the limits store refused the settlement of %s (key %s): %s",
                    settlement.grant.reservation_id,
                    settlement.grant.key,
                    reply,
                )
                spent.append({})
            else:
                spent.append(_spent(reply))
        return spent

    async def usage(self, key: str) -> Usage:
        now = self.clock()
        _, res, resexp, spend = _key_names(key)
        fields = [f"{spend_field(w, now)}:{unit}" for w in WINDOWS for unit in ("t", "u")]
        values = await self.store.call(self.store.client.hmget(spend, fields))
        held: dict[str, str] = await self.store.call(
            self.store.client.hgetall(res)  # type: ignore[arg-type]
        )
        expiries: list[float | None] = []
        if held:
            expiries = await self.store.call(self.store.client.zmscore(resexp, list(held)))
        reserved = [
            amount.split(" ")
            for amount, expiry in zip(held.values(), expiries, strict=True)
            if expiry is not None and expiry > now
        ]
        windows = []
        for i, w in enumerate(WINDOWS):
            start, end = window_bounds(w, now)
            t, u = values[2 * i], values[2 * i + 1]
            windows.append(WindowUsage(w, start, end, int(t or 0), float(u or 0)))
        return Usage(
            key,
            tuple(windows),
            sum(int(t) for t, _ in reserved),
            sum(float(u) for _, u in reserved),
        )

    async def close(self) -> None:
        await self.store.close()


@dataclass(frozen=True)
class KeyChange:
    """What one key change writes: digest → key body, and what happens to the name."""

    bodies: dict[str, str]
    new_live: str | None = None  # the digest the name now means (a rotation)
    retire_until: float | None = None  # the old live digest's end (a rotation)
    drop_name: bool = False  # no live key any more (a revocation)


class RedisKeyStore:
    """`KeyStore` over Redis: `sluice:keys` (digest → key JSON), `sluice:keynames` (live)."""

    KEYS = f"{PREFIX}keys"
    NAMES = f"{PREFIX}keynames"

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def find(self, secret_sha256: str) -> StoredKey | None:
        body = await self.store.call(self.store.client.hget(self.KEYS, secret_sha256))
        return StoredKey.model_validate_json(body) if body else None

    async def add(self, key: StoredKey) -> None:
        added = await self.store.call(
            self.store.add_key(
                keys=[self.NAMES, self.KEYS],
                args=[key.name, key.secret_sha256, key.model_dump_json()],
            )
        )
        if not added:
            raise KeyExists(key.name)

    async def all(self) -> list[StoredKey]:
        bodies: dict[str, str] = await self.store.call(
            self.store.client.hgetall(self.KEYS)  # type: ignore[arg-type]
        )
        keys = [StoredKey.model_validate_json(b) for b in bodies.values()]
        # As SQLite orders them: by name, the live key first, then revoked ones by date.
        return sorted(keys, key=lambda k: (k.name, k.revoked_at is not None, k.revoked_at or 0))

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        def change(live: StoredKey, in_grace: list[StoredKey]) -> KeyChange:
            ended = {
                key.secret_sha256: key.model_copy(update={"revoked_at": at}).model_dump_json()
                for key in (live, *in_grace)
            }
            return KeyChange(ended, drop_name=True)

        return await self._change_live(name, change, at)

    async def update(self, name: str, change: PolicyChange) -> tuple[StoredKey, KeyPolicy] | None:
        made: list[KeyPolicy] = []

        def write(live: StoredKey, in_grace: list[StoredKey]) -> KeyChange:
            policy = change(live.policy)
            made[:] = [policy]
            # Secrets rotated out but still in their grace period follow the policy too.
            return KeyChange(
                {
                    key.secret_sha256: key.model_copy(update={"policy": policy}).model_dump_json()
                    for key in (live, *in_grace)
                }
            )

        before = await self._change_live(name, write, time.time())
        return None if before is None else (before, made[0])

    async def rotate(
        self, name: str, secret_sha256: str, old_until: float
    ) -> tuple[StoredKey, StoredKey] | None:
        made: list[StoredKey] = []

        def change(live: StoredKey, _: list[StoredKey]) -> KeyChange:
            new = StoredKey(policy=live.policy, secret_sha256=secret_sha256)
            made[:] = [new]
            retired = live.model_copy(update={"revoked_at": old_until})
            return KeyChange(
                {
                    live.secret_sha256: retired.model_dump_json(),
                    new.secret_sha256: new.model_dump_json(),
                },
                new_live=new.secret_sha256,
                retire_until=old_until,
            )

        before = await self._change_live(name, change, time.time())
        return None if before is None else (before, made[0])

    def _previous(self, name: str) -> str:
        """The sorted set of a name's rotated-out digests, scored by when each ends."""
        return f"{PREFIX}keyprev:{name}"

    async def _change_live(
        self, name: str, change: Callable[[StoredKey, list[StoredKey]], KeyChange], now: float
    ) -> StoredKey | None:
        """Read the live key called `name` and its rotated-out secrets still working at `now`,
        and write what `change(live, in_grace)` says, in one transaction, retried if another
        writer got between (WATCH). The live key as it was, or None if there is none."""
        previous = self._previous(name)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(WatchError),
                stop=stop_after_attempt(WATCH_ATTEMPTS),
                wait=wait_random_exponential(multiplier=WATCH_BACKOFF_S, max=WATCH_BACKOFF_MAX_S),
                reraise=True,
            ):
                with attempt:
                    return await self._change_once(name, change, now, previous)
        except WatchError:
            raise Conflict(
                f"The key '{name}' is being changed by other requests at the same time; retry."
            ) from None
        raise AssertionError("unreachable: AsyncRetrying returns or raises")

    async def _change_once(
        self,
        name: str,
        change: Callable[[StoredKey, list[StoredKey]], KeyChange],
        now: float,
        previous: str,
    ) -> StoredKey | None:
        """One attempt of `_change_live`; WatchError when another writer got between."""
        try:
            async with asyncio.timeout(self.store.timeout_s * 4):
                pipe: Any
                async with self.store.client.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.NAMES, self.KEYS, previous)
                    digest = await pipe.hget(self.NAMES, name)
                    body = await pipe.hget(self.KEYS, digest) if digest else None
                    if body is None:
                        return None
                    live = StoredKey.model_validate_json(body)
                    grace = await pipe.zrangebyscore(previous, f"({now!r}", "+inf")
                    bodies = await pipe.hmget(self.KEYS, grace) if grace else []
                    in_grace = [StoredKey.model_validate_json(b) for b in bodies if b]
                    write = change(live, in_grace)
                    pipe.multi()
                    pipe.hset(self.KEYS, mapping=write.bodies)
                    if write.new_live is not None:
                        pipe.hset(self.NAMES, name, write.new_live)
                    if write.retire_until is not None:
                        pipe.zadd(previous, {live.secret_sha256: write.retire_until})
                        pipe.zremrangebyscore(previous, "-inf", f"({now!r}")
                    if write.drop_name:
                        pipe.hdel(self.NAMES, name)
                        pipe.delete(previous)
                    await pipe.execute()
                    return live
        except WatchError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreFailure(f"redis: {type(exc).__name__}: {exc}") from exc

    async def count_all(self) -> int:
        count: int = await self.store.call(self.store.client.hlen(self.KEYS))
        return count

    async def count_live(self) -> int:
        count: int = await self.store.call(self.store.client.hlen(self.NAMES))
        return count

    async def close(self) -> None:
        await self.store.close()
