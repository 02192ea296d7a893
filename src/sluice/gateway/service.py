"""`Gateway`: the request path's one entry to keys, admission, quotas and settlement.

Routes call, in order: `authenticate` (401/403), `admit` (503 shedding, before any
tokenising), then, once the job is planned, `reserve` (429), which returns a `Ticket`.
Whatever ends the request, its `settle` runs exactly once (routes guarantee it): the
reservation is replaced by what was used (`prompt + generated` tokens and their price).

Redis trouble (`StoreFailure`) is decided here. Fail-open: the request is reserved against
a process-local `LocalQuota`, a warning is logged (at most every 10 s) and
`sluice_store_failures_total` counts it. Fail-closed: 503 `store_unavailable`. Either way no
call waits longer than the store's bounded timeout.

Nothing the store missed is lost. Every settlement that did not reach it (a failed attempt,
or a request the fallback admitted) waits in `pending`, and so does a zero-use settlement
that closes a reservation whose `reserve` failed (a stalled Redis may still run it later).
The backlog is sent in batches by a background task that retries every second, and before
any new reservation, so the budget a key meets afterwards counts the outage's spend. The
store counts each reservation id once (store_redis.py), so resending is always safe. At
shutdown the backlog gets a last attempt; what still cannot be sent is logged with its total.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sluice.config import GatewaySettings, ModelPrice, PricingSettings, Settings
from sluice.gateway.admission import Admission
from sluice.gateway.alerts import BudgetAlerts, BudgetCrossing
from sluice.gateway.auth import KeyRing, Principal, load_keys_file
from sluice.gateway.keys import KeyStore
from sluice.gateway.quota import (
    BudgetLeft,
    Clock,
    Demand,
    Grant,
    Limits,
    QuotaStore,
    RateView,
    Settlement,
    rate_headers,
    spend_field,
    wall_clock,
)
from sluice.gateway.store_local import (
    Database,
    LocalQuota,
    MemoryLedger,
    SqliteKeyStore,
    SqliteLedger,
)
from sluice.gateway.store_redis import RedisKeyStore, RedisQuota, RedisStore, StoreFailure

logger = logging.getLogger(__name__)

WARN_EVERY_S = 10.0
MAX_PENDING_SETTLEMENTS = 100_000
REPLAY_BATCH = 500  # settlements per pipelined round trip
REPLAY_RETRY_S = 1.0


@dataclass
class Ticket:
    """One admitted request's reservation and what it has used so far."""

    principal: Principal
    grant: Grant | None  # None for the anonymous principal (no quota)
    prompt_tokens: int
    price: ModelPrice
    output_tokens: int = 0
    started: bool = False
    settled: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    limits: Limits | None = None  # the key's, as reserved against (None: no quota)
    engine: bool = True  # the in-process engine serves it (admission counts its tokens)

    @property
    def usd(self) -> float:
        return self.price.cost(self.prompt_tokens, self.output_tokens)


def build_stores(settings: Settings) -> tuple[KeyStore, QuotaStore]:
    """The key and quota stores `settings.gateway.store` names."""
    gw = settings.gateway
    if gw.store == "redis":
        if gw.redis_url is None:
            raise ValueError("gateway.store=redis needs gateway.redis_url")
        shared = RedisStore(gw.redis_url, gw.redis_timeout_s)
        return RedisKeyStore(shared), RedisQuota(shared)
    db = Database(settings.database_path)
    return SqliteKeyStore(db), LocalQuota(SqliteLedger(db))


def build_keys(settings: Settings, cache_s: float | None = None) -> tuple[KeyRing, QuotaStore]:
    """The key ring (keys file + key store) and the quota store of `settings`; `cache_s`
    overrides how long looked-up keys are trusted (the CLI trusts nothing)."""
    key_store, quota = build_stores(settings)
    gw = settings.gateway
    file_keys = load_keys_file(gw.keys_file) if gw.keys_file else {}
    ring = KeyRing(
        file_keys,
        key_store,
        gw.key_cache_s if cache_s is None else cache_s,
        file_path=gw.keys_file,
    )
    return ring, quota


async def close_keys(keys: KeyRing, quota: QuotaStore) -> None:
    await quota.close()
    await keys.store.close()


class Gateway:
    """Keys, admission and quotas for one app (see module docstring)."""

    def __init__(
        self,
        settings: GatewaySettings,
        pricing: PricingSettings,
        keys: KeyRing,
        quota: QuotaStore,
        admission: Admission,
        *,
        request_timeout_s: float = 600.0,
        on_store_failure: Callable[[str], None] = lambda _: None,
        on_budget: Callable[[str, Limits, BudgetLeft], None] = lambda *_: None,
        clock: Clock = wall_clock,
        alerts: BudgetAlerts | None = None,
    ) -> None:
        self.settings = settings
        self.request_timeout_s = request_timeout_s
        self.pricing = pricing
        self.keys = keys
        self.quota = quota
        self.admission = admission
        self.clock = clock
        self.fallback_ledger = MemoryLedger()
        self.fallback = LocalQuota(self.fallback_ledger, clock=clock)
        # What each key's budgets had left at its last reservation the store made: the
        # fallback starts an outage from there, not from a full budget (`_seed_fallback`).
        self._budget_left: dict[str, BudgetLeft] = {}
        self._seeded: set[str] = set()  # keys the fallback has seeded in this outage
        self.on_store_failure = on_store_failure
        self.on_budget = on_budget
        self.alerts = alerts or BudgetAlerts(settings.budget_alert_thresholds)
        # Settlements the store has not acknowledged, oldest first (see module docstring).
        self.pending: collections.deque[Settlement] = collections.deque()
        self._sending: asyncio.Task[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._last_warning = -WARN_EVERY_S

    @classmethod
    def build(
        cls,
        settings: Settings,
        admission: Admission,
        on_store_failure: Callable[[str], None] = lambda _: None,
        on_budget: Callable[[str, Limits, BudgetLeft], None] = lambda *_: None,
        on_budget_alert: Callable[[BudgetCrossing], None] = lambda _: None,
    ) -> Gateway:
        keys, quota = build_keys(settings)
        return cls(
            settings.gateway,
            settings.pricing,
            keys,
            quota,
            admission,
            request_timeout_s=settings.limits.request_timeout_s,
            on_store_failure=on_store_failure,
            on_budget=on_budget,
            alerts=BudgetAlerts(
                settings.gateway.budget_alert_thresholds,
                settings.gateway.budget_webhook_url,
                on_budget_alert,
            ),
        )

    async def close(self) -> None:
        """Stop retrying, give the backlog one last attempt, then close the stores."""
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        if self.pending:
            try:
                await self.send_pending()
            except StoreFailure as exc:
                tokens = sum(s.tokens for s in self.pending)
                usd = sum(s.usd for s in self.pending)
                logger.error(
                    "limits store unavailable at shutdown (%s): %d settlement(s) totalling "
                    "%d tokens and %.6f USD were not recorded",
                    exc,
                    len(self.pending),
                    tokens,
                    usd,
                )
        await self.alerts.close()
        await close_keys(self.keys, self.quota)

    def _store_failed(self, operation: str, exc: Exception) -> None:
        self.on_store_failure(operation)
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            mode = "failing open (local limits)" if self.fail_open else "failing closed (503)"
            logger.warning("limits store unavailable during %s, %s: %s", operation, mode, exc)

    @property
    def fail_open(self) -> bool:
        return self.settings.redis_failure == "open"

    async def authenticate(self, authorization: str | None) -> Principal:
        try:
            return await self.keys.authenticate(authorization)
        except StoreFailure as exc:
            self._store_failed("authenticate", exc)
            raise  # a StoreFailure is already the 503 `store_unavailable`

    def admit(self, principal: Principal) -> int | None:
        """Shed or admit by priority; the `max_tokens` clamp of the gate, if closed."""
        return self.admission.check(principal.priority)

    async def reserve(
        self,
        principal: Principal,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
        *,
        price: ModelPrice | None = None,
        engine: bool = True,
    ) -> Ticket:
        """Reserve `prompt + max output` tokens and their price (`price`, default the price
        table's for `model`), or raise 429/503. `engine=False`: an upstream serves it, so
        admission (the engine's queue) does not count it."""
        price = price or self.pricing.price_of(model)
        ticket = Ticket(principal, None, prompt_tokens, price, engine=engine)
        if principal.policy is not None:
            demand = Demand(
                principal.name,
                prompt_tokens + max_output_tokens,
                price.cost(prompt_tokens, max_output_tokens),
                ttl_s=self.request_timeout_s,
            )
            limits = ticket.limits = Limits.of(principal.policy)
            ticket.grant = await self._reserve(limits, demand)
            ticket.headers = rate_headers(ticket.grant.requests, ticket.grant.token_view)
            if limits.budget_tokens is not None or limits.budget_usd is not None:
                self.on_budget(principal.name, limits, ticket.grant.budget_left)
                if not ticket.grant.local:
                    self._budget_left[principal.name] = ticket.grant.budget_left
                    if principal.name in self._seeded:  # the store is back: its figures rule
                        self._seeded.discard(principal.name)
                        self.fallback_ledger.forget(principal.name)
        if engine:
            self.admission.queued(prompt_tokens)
        return ticket

    async def _reserve(self, limits: Limits, demand: Demand) -> Grant:
        reservation_id = uuid.uuid4().hex
        try:
            if self.pending:
                await self.send_pending()  # the budget below must count the backlog
        except StoreFailure as exc:
            return self._store_down(limits, demand, reservation_id, exc, sent=False)
        try:
            return await self.quota.reserve(limits, demand, reservation_id)
        except StoreFailure as exc:
            return self._store_down(limits, demand, reservation_id, exc, sent=True)
        except asyncio.CancelledError:
            # The client went away while Redis was running it: the reservation may be made.
            self._close(limits, demand, reservation_id)
            raise

    def _store_down(
        self, limits: Limits, demand: Demand, reservation_id: str, exc: StoreFailure, sent: bool
    ) -> Grant:
        """Fail open (a local reservation) or closed (raise `exc`, the 503); a reservation
        that was sent may still be made by a stalled store, so it is closed later."""
        self._store_failed("reserve", exc)
        if not self.fail_open:
            if sent:
                self._close(limits, demand, reservation_id)
            raise exc  # a StoreFailure is already the 503 `store_unavailable`
        self._seed_fallback(limits, demand.key)
        try:
            local = self.fallback.reserve_now(limits, demand, reservation_id)
        except BaseException:  # refused here (429): what Redis may still make is closed
            if sent:
                self._close(limits, demand, reservation_id)
            raise
        return dataclasses.replace(local, local=True)

    def _seed_fallback(self, limits: Limits, key: str) -> None:
        """Once per outage and key: count in the fallback's ledger what the key's budgets had
        used by its last shared reservation (budget less what was left, outstanding
        reservations included: on the safe side), so an outage does not hand every replica
        a fresh budget. A key this process never reserved through the store starts from
        zero (nothing is known here)."""
        if key in self._seeded:
            return
        # Marked seeded even when nothing is known: what the outage records locally must be
        # forgotten once the store is back (its own figures then include it).
        self._seeded.add(key)
        left = self._budget_left.get(key)
        if left is None:
            return
        now = self.clock()
        if limits.budget_tokens is not None and left.tokens is not None:
            used = max(0, int(limits.budget_tokens - left.tokens))
            field = spend_field(limits.budget_tokens_window, now)
            self.fallback_ledger.record(key, [field], used, 0.0)
        if limits.budget_usd is not None and left.usd is not None:
            used_usd = max(0.0, limits.budget_usd - left.usd)
            field = spend_field(limits.budget_usd_window, now)
            self.fallback_ledger.record(key, [field], 0, used_usd)

    def _close(self, limits: Limits, demand: Demand, reservation_id: str) -> None:
        """Queue a zero-use settlement for a reservation the gateway gave up on."""
        tpm = RateView(limits.tpm, 0, 0.0) if limits.tpm else None  # refund against it
        closing = Grant(
            reservation_id, demand.key, demand.tokens, 0.0, None, tpm, ttl_s=demand.ttl_s
        )
        self._keep(Settlement(closing, 0, 0.0, self.clock()))

    def on_tokens(self, ticket: Ticket, count: int) -> None:
        """Tokens arrived for `ticket` (the first ones take it out of the queue)."""
        if not ticket.started:
            ticket.started = True
            self.admission.started(ticket.prompt_tokens)
        ticket.output_tokens += count
        self.admission.generated(count)

    def _settlement_of(self, ticket: Ticket, prompt_tokens: int | None) -> Settlement | None:
        """Mark `ticket` settled and count it out of admission; the settlement to send, or
        None (already settled, or nothing was reserved)."""
        if ticket.settled:
            return None
        ticket.settled = True
        if ticket.engine:
            if not ticket.started:
                self.admission.started(ticket.prompt_tokens)
            self.admission.finished()
        grant = ticket.grant
        if grant is None:
            return None
        if prompt_tokens is not None:
            ticket.prompt_tokens = prompt_tokens
        used = ticket.prompt_tokens + ticket.output_tokens
        return Settlement(grant, used, ticket.usd, self.clock(), ticket.limits)

    async def settle(self, ticket: Ticket, prompt_tokens: int | None = None) -> None:
        """Replace the reservation by what was used: `prompt_tokens` (default: all the
        reserved prompt tokens; fewer when some never reached the engine) plus the generated
        tokens. Runs once, never raises but `CancelledError`, and then the settlement waits
        in the backlog (`close` sends it at shutdown; a `SETTLE` sent twice counts once)."""
        settlement = self._settlement_of(ticket, prompt_tokens)
        if settlement is None:
            return
        grant = settlement.grant
        if grant.local:
            self._keep(settlement)  # the shared store has not seen this spend yet
            await self.fallback.settle(grant, settlement.tokens, settlement.usd)
            return
        try:
            spent = await self.quota.settle(grant, settlement.tokens, settlement.usd, settlement.at)
            self.alerts.observe(settlement, spent)
        except StoreFailure as exc:
            self._store_failed("settle", exc)
            self._keep(settlement)
        except asyncio.CancelledError:
            # the request's task was cancelled (the server's cut-off after a drain): the
            # spend must not be lost with it
            self._keep(settlement)
            raise
        except Exception:
            logger.exception("settlement of %s failed", grant.reservation_id)

    def settle_later(self, ticket: Ticket, prompt_tokens: int | None = None) -> None:
        """`settle` without waiting, for an owner that can no longer wait (its task is being
        cancelled): the settlement goes to the backlog, sent by the retry loop or at
        shutdown."""
        settlement = self._settlement_of(ticket, prompt_tokens)
        if settlement is not None:
            self._keep(settlement)

    def _keep(self, settlement: Settlement) -> None:
        """Hold `settlement` for the store and make sure something keeps sending it."""
        if len(self.pending) >= MAX_PENDING_SETTLEMENTS:
            # Closings (no spend) go first; then the oldest spend, which is logged.
            closing = next((s for s in self.pending if not s.tokens and not s.usd), None)
            dropped = closing if closing is not None else self.pending[0]
            self.pending.remove(dropped)
            if closing is None:
                logger.error(
                    "more than %d settlements wait for the limits store; dropped the oldest "
                    "(%d tokens of key %s)",
                    MAX_PENDING_SETTLEMENTS,
                    dropped.tokens,
                    dropped.grant.key,
                )
        self.pending.append(settlement)
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.get_running_loop().create_task(self._retry_until_sent())

    async def send_pending(self) -> None:
        """Send the backlog now, joining a send already under way; raises `StoreFailure` if
        the store still cannot take it (what was sent stays sent)."""
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())
            # Whoever awaits it sees the failure; a caller that went away leaves it here.
            self._sending.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._sending)

    async def _send(self) -> None:
        sent = 0
        while self.pending:
            batch = [self.pending[i] for i in range(min(REPLAY_BATCH, len(self.pending)))]
            try:
                for settlement, spent in zip(
                    batch, await self.quota.settle_many(batch), strict=True
                ):
                    self.alerts.observe(settlement, spent)
            except StoreFailure:
                raise
            except Exception:
                logger.exception("dropped %d settlements the limits store refused", len(batch))
            for settlement in batch:  # sent: still first, unless `_keep` dropped it meanwhile
                if self.pending and self.pending[0] is settlement:
                    self.pending.popleft()
            sent += len(batch)
        if sent:
            logger.info("limits store answers again; sent %d pending settlement(s)", sent)

    async def _retry_until_sent(self) -> None:
        while self.pending:
            try:
                await self.send_pending()
            except StoreFailure:
                await asyncio.sleep(REPLAY_RETRY_S)
