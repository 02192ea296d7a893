"""The embedded store: no server needed. Keys and spend in SQLite (WAL), buckets in memory.

`LocalQuota` decides in plain Python with no `await` between check and reserve, so on one
event loop every reservation is atomic. Spend goes to a `SpendLedger`: `SqliteLedger`
writes each settlement through (durable across restarts) and caches what it has read, so a
reservation never waits on the disk; `MemoryLedger` is the fail-open fallback beside Redis.
One SQLite file serves one process; replicas share limits through Redis instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from sluice.gateway.keys import KeyExists, KeyPolicy, PolicyChange, StoredKey, Window
from sluice.gateway.quota import (
    CONCURRENCY_RETRY_S,
    WINDOWS,
    Bucket,
    BudgetLeft,
    Clock,
    Demand,
    Grant,
    KeyState,
    Limits,
    Refusal,
    RefusalKind,
    Settlement,
    Spent,
    Usage,
    WindowUsage,
    bucket_at,
    closes_at,
    spend_field,
    usd_slack,
    view,
    wait_for,
    wall_clock,
    window_bounds,
)


class SpendLedger(Protocol):
    def spent(self, key: str, field: str) -> tuple[int, float]: ...

    async def add(self, key: str, fields: list[str], tokens: int, usd: float) -> None: ...


class MemoryLedger:
    """Spend kept in this process only."""

    def __init__(self) -> None:
        self._spend: dict[tuple[str, str], tuple[int, float]] = {}

    def spent(self, key: str, field: str) -> tuple[int, float]:
        return self._spend.get((key, field), (0, 0.0))

    def record(self, key: str, fields: list[str], tokens: int, usd: float) -> None:
        for f in fields:
            t, u = self.spent(key, f)
            self._spend[(key, f)] = (t + tokens, u + usd)

    async def add(self, key: str, fields: list[str], tokens: int, usd: float) -> None:
        self.record(key, fields, tokens, usd)

    def forget(self, key: str) -> None:
        """Drop what `key` spent here (the shared store has it again)."""
        for stored in [k for k in self._spend if k[0] == key]:
            del self._spend[stored]


class Database:
    """The embedded store's SQLite file: WAL mode, one connection, calls off the event loop."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS keys (
        name TEXT NOT NULL,
        secret_sha256 TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        revoked_at REAL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS live_key_name ON keys(name) WHERE revoked_at IS NULL;
    CREATE TABLE IF NOT EXISTS spend (
        key TEXT NOT NULL,
        window TEXT NOT NULL,
        tokens INTEGER NOT NULL DEFAULT 0,
        usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (key, window)
    );
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(self.SCHEMA)

    def run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def add_spend(self, key: str, fields: list[str], tokens: int, usd: float) -> None:
        """Add to the spend of every window in one transaction."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO spend(key, window, tokens, usd) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(key, window) DO UPDATE SET tokens = tokens + excluded.tokens, "
                    "usd = usd + excluded.usd",
                    [(key, f, tokens, usd) for f in fields],
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN IMMEDIATE … COMMIT (ROLLBACK on any error), held
        against the other users of this process's connection."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    async def arun(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self.run, sql, args)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteLedger:
    """Spend in SQLite, written through on every settlement and cached once read."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache = MemoryLedger()
        self._loaded: set[tuple[str, str]] = set()

    def spent(self, key: str, field: str) -> tuple[int, float]:
        if (key, field) not in self._loaded:
            rows = self.db.run(
                "SELECT tokens, usd FROM spend WHERE key=? AND window=?", (key, field)
            )
            if rows:
                tokens, usd = rows[0]
                assert isinstance(tokens, int) and isinstance(usd, float | int)
                self._cache.record(key, [field], tokens, float(usd))
            self._loaded.add((key, field))
        return self._cache.spent(key, field)

    async def add(self, key: str, fields: list[str], tokens: int, usd: float) -> None:
        for f in fields:
            self.spent(key, f)  # load before adding, so the cache stays the file's sum
        self._cache.record(key, fields, tokens, usd)
        await asyncio.to_thread(self.db.add_spend, key, fields, tokens, usd)


class LocalQuota:
    """Token buckets and reservations in memory, spend in a ledger (see quota.py)."""

    def __init__(self, ledger: SpendLedger, clock: Clock = wall_clock) -> None:
        self.ledger = ledger
        self.clock = clock
        self._keys: dict[str, KeyState] = {}

    def reserve_now(self, limits: Limits, demand: Demand, reservation_id: str) -> Grant:
        """`reserve` without the coroutine: nothing here yields, so it is atomic."""
        now = self.clock()
        state = self._keys.setdefault(demand.key, KeyState())
        state.purge(now)
        requests = bucket_at(state.requests, limits.rpm, now) if limits.rpm else None
        tokens = bucket_at(state.tokens, limits.tpm, now) if limits.tpm else None
        refusal = self._refusal(limits, demand, now, state, requests, tokens)
        if refusal is not None:
            raise refusal.error(limits, demand.key)
        if requests is not None:
            requests.level -= 1
            state.requests = requests
        if tokens is not None:
            tokens.level -= demand.tokens
            state.tokens = tokens
        state.reservations[reservation_id] = (
            demand.tokens,
            demand.usd,
            closes_at(now, demand.ttl_s),
        )
        return Grant(
            reservation_id,
            demand.key,
            demand.tokens,
            demand.usd,
            requests=view(requests.level, limits.rpm) if requests and limits.rpm else None,
            token_view=view(tokens.level, limits.tpm) if tokens and limits.tpm else None,
            ttl_s=demand.ttl_s,
            budget_left=self._budget_left(limits, demand.key, now, state),
        )

    def _budget_left(self, limits: Limits, key: str, now: float, state: KeyState) -> BudgetLeft:
        """Each budget less spend and every reservation (this one included)."""
        reserved_tokens, reserved_usd = state.reserved
        tokens = usd = None
        if limits.budget_tokens is not None:
            spent = self.ledger.spent(key, spend_field(limits.budget_tokens_window, now))[0]
            tokens = float(limits.budget_tokens - spent - reserved_tokens)
        if limits.budget_usd is not None:
            spent_usd = self.ledger.spent(key, spend_field(limits.budget_usd_window, now))[1]
            usd = limits.budget_usd - spent_usd - reserved_usd
        return BudgetLeft(tokens, usd)

    def _refusal(
        self,
        limits: Limits,
        demand: Demand,
        now: float,
        state: KeyState,
        requests: Bucket | None,
        tokens: Bucket | None,
    ) -> Refusal | None:
        req_view = view(requests.level, limits.rpm) if requests and limits.rpm else None
        tok_view = view(tokens.level, limits.tpm) if tokens and limits.tpm else None
        in_flight = len(state.reservations)
        if limits.max_concurrent is not None and in_flight >= limits.max_concurrent:
            return Refusal(
                "concurrency", CONCURRENCY_RETRY_S, req_view, tok_view, need=1, have=in_flight
            )
        if limits.rpm and requests is not None and requests.level < 1:
            return Refusal(
                "requests",
                wait_for(requests.level, 1, limits.rpm),
                req_view,
                tok_view,
            )
        if limits.tpm and tokens is not None and tokens.level < demand.tokens:
            retry = (
                60.0
                if demand.tokens > limits.tpm
                else wait_for(tokens.level, demand.tokens, limits.tpm)
            )
            return Refusal(
                "tokens",
                retry,
                req_view,
                tok_view,
                need=demand.tokens,
                have=tokens.level,
            )
        reserved = state.reserved
        budgets: tuple[tuple[RefusalKind, float | None, Window, int], ...] = (
            ("budget_tokens", limits.budget_tokens, limits.budget_tokens_window, 0),
            ("budget_usd", limits.budget_usd, limits.budget_usd_window, 1),
        )
        for kind, budget, window, part in budgets:  # part: 0 = tokens, 1 = USD
            if budget is None:
                continue
            spent = self.ledger.spent(demand.key, spend_field(window, now))[part]
            left = budget - spent - reserved[part]
            need = (demand.tokens, demand.usd)[part]
            if need > left + usd_slack(budget) * part:
                end = window_bounds(window, now)[1]
                return Refusal(kind, end - now, req_view, tok_view, need, max(0, left))
        return None

    async def reserve(self, limits: Limits, demand: Demand, reservation_id: str) -> Grant:
        return self.reserve_now(limits, demand, reservation_id)

    async def settle(self, grant: Grant, tokens: int, usd: float, at: float | None = None) -> Spent:
        now = self.clock()
        state = self._keys.setdefault(grant.key, KeyState())
        held = state.reservations.pop(grant.reservation_id, None) is not None
        if held and state.tokens is not None and grant.token_view is not None:
            capacity = grant.token_view.limit
            refreshed = bucket_at(state.tokens, capacity, now)
            refreshed.level = min(float(capacity), refreshed.level + grant.tokens - tokens)
            state.tokens = refreshed
        fields = [spend_field(w, now if at is None else at) for w in WINDOWS]
        await self.ledger.add(grant.key, fields, tokens, usd)
        return {f: self.ledger.spent(grant.key, f) for f in fields}

    async def settle_many(self, settlements: list[Settlement]) -> list[Spent]:
        return [await self.settle(s.grant, s.tokens, s.usd, s.at) for s in settlements]

    async def usage(self, key: str) -> Usage:
        now = self.clock()
        state = self._keys.get(key, KeyState())
        state.purge(now)
        reserved_tokens, reserved_usd = state.reserved
        windows = []
        for w in WINDOWS:
            start, end = window_bounds(w, now)
            tokens, usd = self.ledger.spent(key, spend_field(w, now))
            windows.append(WindowUsage(w, start, end, tokens, usd))
        return Usage(key, tuple(windows), reserved_tokens, reserved_usd)

    async def close(self) -> None:
        pass


class SqliteKeyStore:
    """Keys in the embedded SQLite file (the key body is the `StoredKey` as JSON)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def find(self, secret_sha256: str) -> StoredKey | None:
        rows = await self.db.arun("SELECT body FROM keys WHERE secret_sha256=?", (secret_sha256,))
        return StoredKey.model_validate_json(str(rows[0][0])) if rows else None

    async def add(self, key: StoredKey) -> None:
        try:
            await self.db.arun(
                "INSERT INTO keys(name, secret_sha256, body, revoked_at) VALUES (?, ?, ?, NULL)",
                (key.name, key.secret_sha256, key.model_dump_json()),
            )
        except sqlite3.IntegrityError as exc:
            raise KeyExists(key.name) from exc

    async def all(self) -> list[StoredKey]:
        rows = await self.db.arun("SELECT body FROM keys ORDER BY name, revoked_at")
        return [StoredKey.model_validate_json(str(r[0])) for r in rows]

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        return await asyncio.to_thread(self._revoke, name, at)

    def _revoke(self, name: str, at: float) -> StoredKey | None:
        with self.db.transaction() as conn:
            before = _live(conn, name)
            if before is None:
                return None
            for key in _working(conn, name, at):  # the live secret and those in their grace
                ended = key.model_copy(update={"revoked_at": at})
                conn.execute(
                    "UPDATE keys SET revoked_at=?, body=? WHERE secret_sha256=?",
                    (at, ended.model_dump_json(), key.secret_sha256),
                )
            return before

    async def update(self, name: str, change: PolicyChange) -> tuple[StoredKey, KeyPolicy] | None:
        return await asyncio.to_thread(self._update, name, change)

    def _update(self, name: str, change: PolicyChange) -> tuple[StoredKey, KeyPolicy] | None:
        with self.db.transaction() as conn:
            before = _live(conn, name)
            if before is None:
                return None
            policy = change(before.policy)
            # Secrets rotated out but still in their grace period follow the policy too.
            for key in _working(conn, name, time.time()):
                changed = key.model_copy(update={"policy": policy})
                conn.execute(
                    "UPDATE keys SET body=? WHERE secret_sha256=?",
                    (changed.model_dump_json(), key.secret_sha256),
                )
            return before, policy

    async def rotate(
        self, name: str, secret_sha256: str, old_until: float
    ) -> tuple[StoredKey, StoredKey] | None:
        return await asyncio.to_thread(self._rotate, name, secret_sha256, old_until)

    def _rotate(
        self, name: str, secret_sha256: str, old_until: float
    ) -> tuple[StoredKey, StoredKey] | None:
        with self.db.transaction() as conn:
            before = _live(conn, name)
            if before is None:
                return None
            new = StoredKey(policy=before.policy, secret_sha256=secret_sha256)
            retired = before.model_copy(update={"revoked_at": old_until})
            conn.execute(
                "UPDATE keys SET revoked_at=?, body=? WHERE secret_sha256=?",
                (old_until, retired.model_dump_json(), before.secret_sha256),
            )
            conn.execute(
                "INSERT INTO keys(name, secret_sha256, body, revoked_at) VALUES (?, ?, ?, NULL)",
                (new.name, new.secret_sha256, new.model_dump_json()),
            )
            return before, new

    async def count_all(self) -> int:
        rows = await self.db.arun("SELECT count(*) FROM keys")
        return int(str(rows[0][0]))

    async def count_live(self) -> int:
        rows = await self.db.arun("SELECT count(*) FROM keys WHERE revoked_at IS NULL")
        return int(str(rows[0][0]))

    async def close(self) -> None:
        self.db.close()


def _live(conn: sqlite3.Connection, name: str) -> StoredKey | None:
    """The live (unrevoked) key called `name`, inside a transaction."""
    row = conn.execute("SELECT body FROM keys WHERE name=? AND revoked_at IS NULL", (name,))
    found = row.fetchone()
    return StoredKey.model_validate_json(str(found[0])) if found else None


def _working(conn: sqlite3.Connection, name: str, now: float) -> list[StoredKey]:
    """Every secret of `name` that still works at `now`: the live one and those in grace."""
    rows = conn.execute(
        "SELECT body FROM keys WHERE name=? AND (revoked_at IS NULL OR revoked_at > ?)",
        (name, now),
    ).fetchall()
    return [StoredKey.model_validate_json(str(body)) for (body,) in rows]
