"""The embedded store: spend in SQLite survives a restart, and keys behave as a `KeyStore`.

`KeyStoreContract` holds the key store cases; `TestSqliteKeyStore` runs them here and
`tests/unit/test_store_redis.py` runs the same cases on `RedisKeyStore`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sluice.errors import QuotaExceeded
from sluice.gateway.keys import KeyExists, KeyPolicy, KeyStore, StoredKey, digest
from sluice.gateway.quota import Limits
from sluice.gateway.store_local import Database, LocalQuota, SqliteKeyStore, SqliteLedger
from tests.conftest import FakeClock
from tests.unit.test_quota import KEY, demand, rid


def stored(name: str, secret: str | None = None, **policy: object) -> StoredKey:
    return StoredKey(
        policy=KeyPolicy.model_validate({"name": name, **policy}),
        secret_sha256=digest(secret or f"sk-sluice-secret-of-{name}"),
        created_at=1000.0,
    )


# -- spend across restarts -----------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sluice.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database(db_path)
    yield database
    database.close()


def test_database_is_in_wal_mode(db: Database, db_path: Path) -> None:
    assert db_path.is_file()  # its folder was created
    assert db.run("PRAGMA journal_mode") == [("wal",)]


async def test_spend_survives_a_restart(db_path: Path, clock: FakeClock) -> None:
    first = Database(db_path)
    quota = LocalQuota(SqliteLedger(first), clock=clock)
    grant = await quota.reserve(Limits(), demand(tokens=50, usd=0.5), rid())
    await quota.settle(grant, tokens=40, usd=0.375)
    grant = await quota.reserve(Limits(), demand(tokens=5, usd=0.5), rid())
    await quota.settle(grant, tokens=2, usd=0.125)
    first.close()

    second = Database(db_path)
    try:
        usage = await LocalQuota(SqliteLedger(second), clock=clock).usage(KEY)
    finally:
        second.close()
    assert [(w.window, w.tokens, w.usd) for w in usage.windows] == [
        ("hour", 42, 0.5),
        ("day", 42, 0.5),
        ("month", 42, 0.5),
    ]
    assert usage.reserved_tokens == 0  # reservations are process memory, gone with it


async def test_settling_first_thing_after_a_restart_adds_to_the_stored_spend(
    db_path: Path, clock: FakeClock
) -> None:
    for tokens in (10, 20, 30):  # three "processes", each settling before reading anything
        database = Database(db_path)
        quota = LocalQuota(SqliteLedger(database), clock=clock)
        grant = await quota.reserve(Limits(), demand(tokens=tokens), rid())
        await quota.settle(grant, tokens=tokens, usd=0.0)
        usage = await quota.usage(KEY)
        database.close()
    assert [w.tokens for w in usage.windows] == [60, 60, 60]


async def test_a_spent_budget_still_refuses_after_a_restart(
    db_path: Path, clock: FakeClock
) -> None:
    limits = Limits(budget_tokens=100, budget_usd=1.0, budget_usd_window="day")
    first = Database(db_path)
    quota = LocalQuota(SqliteLedger(first), clock=clock)
    grant = await quota.reserve(limits, demand(tokens=100, usd=0.25), rid())
    await quota.settle(grant, tokens=100, usd=0.25)
    first.close()

    second = Database(db_path)
    try:
        quota = LocalQuota(SqliteLedger(second), clock=clock)
        with pytest.raises(QuotaExceeded) as info:
            await quota.reserve(limits, demand(tokens=1), rid())
        assert "tokens budget" in info.value.message
        # Spend read back is added to, not replaced: the USD budget has 0.75 left.
        grant = await quota.reserve(Limits(budget_usd=1.0), demand(usd=0.5), rid())
        await quota.settle(grant, tokens=1, usd=0.5)
        with pytest.raises(QuotaExceeded):
            await quota.reserve(Limits(budget_usd=1.0), demand(usd=0.5), rid())
    finally:
        second.close()
    third = Database(db_path)
    try:
        usage = await LocalQuota(SqliteLedger(third), clock=clock).usage(KEY)
    finally:
        third.close()
    assert (usage.windows[2].tokens, usage.windows[2].usd) == (101, 0.75)


# -- keys ----------------------------------------------------------------------------------


class KeyStoreContract:
    """Cases every `KeyStore` passes; a subclass provides the `keys` fixture (empty store)."""

    async def test_empty(self, keys: KeyStore) -> None:
        assert await keys.all() == []
        assert await keys.count_live() == 0
        assert await keys.find(digest("sk-sluice-nobody")) is None
        assert await keys.revoke("nobody", 2000.0) is None

    async def test_add_and_find(self, keys: KeyStore) -> None:
        key = stored("team-a", rpm=60, priority="low", models=["m"])
        await keys.add(key)
        found = await keys.find(key.secret_sha256)
        assert found == key
        assert found is not None and found.policy.rpm == 60 and found.revoked_at is None
        assert await keys.find(digest("sk-sluice-someone-else")) is None
        assert await keys.count_live() == 1

    async def test_all_lists_keys_by_name(self, keys: KeyStore) -> None:
        for name in ("zeta", "alpha", "mid"):
            await keys.add(stored(name))
        assert [k.name for k in await keys.all()] == ["alpha", "mid", "zeta"]
        assert await keys.count_live() == 3

    async def test_revoke(self, keys: KeyStore) -> None:
        key = stored("team-a")
        await keys.add(key)
        await keys.add(stored("team-b"))
        assert await keys.revoke("team-a", 2000.0) == key  # the key as it was
        assert await keys.revoke("team-a", 3000.0) is None  # already revoked
        found = await keys.find(key.secret_sha256)
        assert found is not None and found.revoked_at == 2000.0  # still found, as revoked
        assert await keys.count_live() == 1
        listed = {k.name: k.revoked_at for k in await keys.all()}
        assert listed == {"team-a": 2000.0, "team-b": None}

    async def test_a_second_live_key_with_the_same_name_is_refused(self, keys: KeyStore) -> None:
        first = stored("team-a", secret="sk-sluice-first")
        await keys.add(first)
        with pytest.raises(KeyExists):
            await keys.add(stored("team-a", secret="sk-sluice-second"))
        assert await keys.find(digest("sk-sluice-second")) is None
        assert await keys.find(first.secret_sha256) == first
        assert await keys.count_live() == 1

    async def test_concurrent_updates_of_one_key_all_land(self, keys: KeyStore) -> None:
        # two admins (or twenty) changing one key at once: none fails, none is undone
        await keys.add(stored("team-a", rpm=1))
        bump: Callable[[KeyPolicy], KeyPolicy] = lambda p: p.model_copy(  # noqa: E731
            update={"rpm": p.rpm + 1}
        )
        await asyncio.gather(*(keys.update("team-a", bump) for _ in range(30)))
        found = await keys.find(stored("team-a").secret_sha256)
        assert found is not None and found.policy.rpm == 31

    async def test_update_changes_the_live_policy_in_place(self, keys: KeyStore) -> None:
        key = stored("team-a", rpm=5)
        await keys.add(key)
        await keys.add(stored("team-b", rpm=7))
        result = await keys.update(
            "team-a", lambda p: p.model_copy(update={"rpm": p.rpm * 10, "max_concurrent": 2})
        )
        assert result is not None
        before, policy = result
        assert before == key and (policy.rpm, policy.max_concurrent) == (50, 2)
        found = await keys.find(key.secret_sha256)
        assert found is not None and found.policy == policy  # same secret, same history
        assert (found.created_at, found.revoked_at) == (key.created_at, None)
        other = await keys.find(stored("team-b").secret_sha256)
        assert other is not None and other.policy.rpm == 7
        assert await keys.update("nobody", lambda p: p) is None

        def refuse(_: KeyPolicy) -> KeyPolicy:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            await keys.update("team-a", refuse)  # what the change raises: nothing changes
        unchanged = await keys.find(key.secret_sha256)
        assert unchanged is not None and unchanged.policy == policy
        await keys.revoke("team-a", 2000.0)
        assert await keys.update("team-a", lambda p: p) is None  # only live keys change

    async def test_rotate_swaps_the_secret_and_keeps_the_old_until_its_grace_ends(
        self, keys: KeyStore
    ) -> None:
        old = stored("team-a", secret="sk-sluice-old", rpm=5)
        await keys.add(old)
        result = await keys.rotate("team-a", digest("sk-sluice-new"), 5000.0)
        assert result is not None
        before, new = result
        assert before == old and new.policy == old.policy
        assert new.secret_sha256 == digest("sk-sluice-new") and new.revoked_at is None
        found_old = await keys.find(old.secret_sha256)
        assert found_old is not None and found_old.revoked_at == 5000.0
        assert found_old.valid_at(4999.0) and not found_old.valid_at(5000.0)
        assert await keys.find(new.secret_sha256) == new
        assert await keys.count_live() == 1
        # the name now means the new key: the next rotation or revocation acts on it
        assert await keys.revoke("team-a", 6000.0) == new
        revoked = await keys.find(new.secret_sha256)
        assert revoked is not None and revoked.revoked_at == 6000.0
        assert await keys.rotate("team-a", digest("sk-x"), 1.0) is None
        assert await keys.find(digest("sk-x")) is None  # nothing changed

    async def test_an_update_and_a_revocation_reach_secrets_still_in_their_grace(
        self, keys: KeyStore
    ) -> None:
        """Disabling or revoking a key stops every secret of it that still works."""
        old = stored("team-a", secret="sk-sluice-old")
        await keys.add(old)
        await keys.rotate("team-a", digest("sk-sluice-new"), time.time() + 600)
        await keys.rotate("team-a", digest("sk-sluice-newer"), time.time() - 1)  # `new` ended
        await keys.update("team-a", lambda p: p.model_copy(update={"enabled": False}))
        found = {k.secret_sha256: k for k in await keys.all()}
        assert not found[digest("sk-sluice-newer")].policy.enabled
        assert not found[old.secret_sha256].policy.enabled  # in its grace: follows
        assert found[digest("sk-sluice-new")].policy.enabled  # over: kept as it ended
        now = time.time()
        assert await keys.revoke("team-a", now) is not None
        for key in await keys.all():
            assert not key.valid_at(now + 0.001), key.secret_sha256  # none works any more
        assert await keys.count_live() == 0

    async def test_a_revoked_name_can_be_added_again(self, keys: KeyStore) -> None:
        old = stored("team-a", secret="sk-sluice-old")
        await keys.add(old)
        await keys.revoke("team-a", 2000.0)
        new = stored("team-a", secret="sk-sluice-new", rpm=5)
        await keys.add(new)
        assert await keys.find(new.secret_sha256) == new
        found_old = await keys.find(old.secret_sha256)
        assert found_old is not None and found_old.revoked_at == 2000.0
        assert await keys.count_live() == 1
        assert sorted(k.revoked_at or 0 for k in await keys.all()) == [0, 2000.0]
        # Revoking by name now means the new key.
        assert await keys.revoke("team-a", 3000.0) == new
        found_new = await keys.find(new.secret_sha256)
        assert found_new is not None and found_new.revoked_at == 3000.0
        assert await keys.count_live() == 0

    async def test_a_secret_another_key_has_is_refused(self, keys: KeyStore) -> None:
        first = stored("team-a", secret="sk-sluice-shared")
        await keys.add(first)
        with pytest.raises(KeyExists):
            await keys.add(stored("team-b", secret="sk-sluice-shared"))
        assert await keys.find(first.secret_sha256) == first

    async def test_a_revoked_secret_cannot_come_back(self, keys: KeyStore) -> None:
        await keys.add(stored("team-a", secret="sk-sluice-leaked"))
        await keys.revoke("team-a", 2000.0)
        with pytest.raises(KeyExists):
            await keys.add(stored("team-a", secret="sk-sluice-leaked"))
        found = await keys.find(digest("sk-sluice-leaked"))
        assert found is not None and found.revoked_at == 2000.0
        assert await keys.count_live() == 0


class TestSqliteKeyStore(KeyStoreContract):
    @pytest.fixture
    async def keys(self, db_path: Path) -> AsyncIterator[SqliteKeyStore]:
        store = SqliteKeyStore(Database(db_path))
        yield store
        await store.close()


async def test_keys_survive_a_restart(db_path: Path) -> None:
    store = SqliteKeyStore(Database(db_path))
    key = stored("team-a")
    await store.add(key)
    await store.add(stored("team-b"))
    await store.revoke("team-b", 2000.0)
    await store.close()
    reopened = SqliteKeyStore(Database(db_path))
    try:
        assert await reopened.find(key.secret_sha256) == key
        assert await reopened.count_live() == 1
        with pytest.raises(KeyExists):
            await reopened.add(stored("team-a", secret="sk-sluice-another"))
    finally:
        await reopened.close()
