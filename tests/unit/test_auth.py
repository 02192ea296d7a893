"""Authentication: the keys file, and `KeyRing` turning an Authorization header into a
`Principal` through the file's keys and a (fake, in-memory) key store with a cache."""

from __future__ import annotations

import logging
import os
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sluice.errors import PermissionDenied, Unauthenticated, error_body, error_response
from sluice.gateway.auth import (
    ANONYMOUS,
    KeyRing,
    KeysFile,
    Principal,
    load_keys_file,
    masked,
)
from sluice.gateway.keys import KeyExists, KeyPolicy, PolicyChange, Priority, StoredKey, digest
from sluice.gateway.store_redis import StoreFailure
from tests.conftest import FakeClock

SECRET = "sk-sluice-0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
OTHER = "sk-sluice-ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvutsr"


class MemoryKeyStore:
    """A `KeyStore` in a dict that counts lookups and can be made to fail; like a real store
    it hands out copies, so a change in the store never reaches a cached answer."""

    def __init__(self) -> None:
        self.keys: dict[str, StoredKey] = {}
        self.failing = False
        self.finds = 0
        self.counts = 0

    def _answer(self) -> None:
        if self.failing:
            raise StoreFailure("redis: ConnectionError: down")

    async def find(self, secret_sha256: str) -> StoredKey | None:
        self._answer()
        self.finds += 1
        key = self.keys.get(secret_sha256)
        return key.model_copy(deep=True) if key is not None else None

    async def add(self, key: StoredKey) -> None:
        self._answer()
        if any(k.name == key.name and k.revoked_at is None for k in self.keys.values()):
            raise KeyExists(key.name)
        self.keys[key.secret_sha256] = key.model_copy(deep=True)

    async def all(self) -> list[StoredKey]:
        self._answer()
        return sorted(self.keys.values(), key=lambda k: k.name)

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        self._answer()
        live = self._live(name)
        if live is None:
            return None
        for sha, key in self.keys.items():
            if key.name == name and key.valid_at(at):
                self.keys[sha] = key.model_copy(update={"revoked_at": at})
        return live

    def _live(self, name: str) -> StoredKey | None:
        return next((k for k in self.keys.values() if k.name == name and not k.revoked_at), None)

    async def update(self, name: str, change: PolicyChange) -> tuple[StoredKey, KeyPolicy] | None:
        self._answer()
        live = self._live(name)
        if live is None:
            return None
        policy = change(live.policy)
        for sha, key in self.keys.items():
            if key.name == name and key.valid_at(time.time()):
                self.keys[sha] = key.model_copy(update={"policy": policy})
        return live, policy

    async def rotate(
        self, name: str, secret_sha256: str, old_until: float
    ) -> tuple[StoredKey, StoredKey] | None:
        self._answer()
        live = self._live(name)
        if live is None:
            return None
        new = StoredKey(policy=live.policy, secret_sha256=secret_sha256)
        self.keys[live.secret_sha256] = live.model_copy(update={"revoked_at": old_until})
        self.keys[secret_sha256] = new
        return live, new.model_copy(deep=True)

    async def count_all(self) -> int:
        self._answer()
        self.counts += 1
        return len(self.keys)

    async def count_live(self) -> int:
        self._answer()
        return sum(k.revoked_at is None for k in self.keys.values())

    async def close(self) -> None:
        pass


def stored(name: str, secret: str = SECRET, **policy: object) -> StoredKey:
    return StoredKey(
        policy=KeyPolicy.model_validate({"name": name, **policy}), secret_sha256=digest(secret)
    )


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def ring(store: MemoryKeyStore, clock: FakeClock) -> KeyRing:
    return KeyRing({}, store, cache_s=1.0, clock=clock)


# -- the keys file -------------------------------------------------------------------------


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_keys_file_secret_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", SECRET)
    path = keys_file(
        tmp_path,
        """
        keys:
          - name: team-a
            secret_env: TEAM_A_KEY
            rpm: 60
            tpm: 40000
            priority: high
        """,
    )
    keys = load_keys_file(path)
    assert list(keys) == [digest(SECRET)]
    key = keys[digest(SECRET)]
    assert key.source == "file"
    assert key.secret_sha256 == digest(SECRET)
    assert key.policy == KeyPolicy(name="team-a", rpm=60, tpm=40000, priority="high")


def test_keys_file_secret_by_digest(tmp_path: Path) -> None:
    sha = digest(SECRET)
    path = keys_file(
        tmp_path,
        f"""
        keys:
          - name: batch
            secret_sha256: {sha.upper()}
            budget_usd: 25
            budget_usd_window: day
        """,
    )
    keys = load_keys_file(path)
    assert list(keys) == [sha]  # stored lowercase, as digests are compared
    assert keys[sha].policy.budget_usd == 25
    assert keys[sha].policy.budget_usd_window == "day"


@pytest.mark.parametrize(
    "secret_lines",
    [
        "secret_env: TEAM_A_KEY\n    secret_sha256: " + "a" * 64,
        "rpm: 5",
    ],
    ids=["both", "neither"],
)
def test_keys_file_needs_exactly_one_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret_lines: str
) -> None:
    monkeypatch.setenv("TEAM_A_KEY", SECRET)
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: ok\n    secret_env: TEAM_A_KEY\n  - name: a\n    {secret_lines}\n"
    )
    with pytest.raises(KeysFile) as info:
        load_keys_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "key #2" in message
    assert "exactly one of secret_sha256 and secret_env" in message


def test_keys_file_duplicate_names(tmp_path: Path) -> None:
    path = keys_file(
        tmp_path,
        f"""
        keys:
          - name: team-a
            secret_sha256: {digest(SECRET)}
          - name: team-a
            secret_sha256: {digest(OTHER)}
        """,
    )
    with pytest.raises(KeysFile, match="the name 'team-a' appears twice"):
        load_keys_file(path)


def test_keys_file_two_names_with_one_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARED", SECRET)
    path = keys_file(
        tmp_path,
        """
        keys:
          - name: team-a
            secret_env: SHARED
          - name: team-b
            secret_env: SHARED
        """,
    )
    with pytest.raises(KeysFile):
        load_keys_file(path)


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_keys_file_env_var_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("TEAM_A_KEY", raising=False)
    else:
        monkeypatch.setenv("TEAM_A_KEY", value)
    path = keys_file(
        tmp_path,
        """
        keys:
          - name: team-a
            secret_env: TEAM_A_KEY
        """,
    )
    with pytest.raises(KeysFile) as info:
        load_keys_file(path)
    assert "'team-a'" in str(info.value)
    assert "$TEAM_A_KEY, which is not set" in str(info.value)


def test_keys_file_bad_yaml(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "keys: [\n  - name: a\n")
    with pytest.raises(KeysFile, match="cannot read keys file"):
        load_keys_file(path)


def test_keys_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KeysFile, match="cannot read keys file"):
        load_keys_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text",
    ["keys:\n  name: a\n", "- name: a\n", "keys:\n", "", "just text\n"],
    ids=["mapping", "top-level-list", "empty-keys", "empty-file", "scalar"],
)
def test_keys_file_must_hold_a_list(tmp_path: Path, text: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(KeysFile, match="must hold a list under 'keys:'"):
        load_keys_file(path)


def test_keys_file_invalid_field_names_it(tmp_path: Path) -> None:
    path = keys_file(
        tmp_path,
        f"""
        keys:
          - name: team-a
            secret_sha256: {digest(SECRET)}
            rpm: 0
        """,
    )
    with pytest.raises(KeysFile, match=r"key #1: rpm: "):
        load_keys_file(path)


def test_keys_file_unknown_field(tmp_path: Path) -> None:
    path = keys_file(
        tmp_path,
        f"""
        keys:
          - name: team-a
            secret_sha256: {digest(SECRET)}
            secret: {SECRET}
        """,
    )
    with pytest.raises(KeysFile) as info:
        load_keys_file(path)
    assert "key #1: secret: " in str(info.value)


# -- KeyRing -------------------------------------------------------------------------------


def test_masked_keeps_only_the_ends() -> None:
    assert masked(SECRET) == "sk-slu****DEFG"
    assert masked("short") == "****"


async def test_no_keys_anywhere_is_open(ring: KeyRing) -> None:
    for header in (None, "", "Bearer whatever", "Basic abc"):
        principal = await ring.authenticate(header)
        assert principal == Principal(ANONYMOUS)
        assert principal.policy is None
        assert principal.priority == "normal"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", SECRET])
async def test_missing_key_is_unauthenticated(
    ring: KeyRing, store: MemoryKeyStore, header: str | None
) -> None:
    await store.add(stored("team-a"))
    with pytest.raises(Unauthenticated) as info:
        await ring.authenticate(header)
    assert "You didn't provide an API key" in info.value.message
    assert error_response(info.value).status_code == 401
    assert error_body(info.value)["error"]["code"] == "invalid_api_key"


async def test_a_valid_key(ring: KeyRing, store: MemoryKeyStore) -> None:
    await store.add(stored("team-a", rpm=5, priority="low"))
    for header in (bearer(SECRET), f"bearer  {SECRET} "):
        principal = await ring.authenticate(header)
        assert principal.name == "team-a"
        assert principal.policy is not None and principal.policy.rpm == 5
        assert principal.priority == "low"


async def test_a_wrong_key_is_masked_in_the_error(ring: KeyRing, store: MemoryKeyStore) -> None:
    await store.add(stored("team-a"))
    with pytest.raises(Unauthenticated) as info:
        await ring.authenticate(bearer(OTHER))
    message = info.value.message
    assert message == f"Incorrect API key provided: {masked(OTHER)}."
    assert OTHER not in message
    assert OTHER[6:-4] not in message


async def test_a_revoked_key_is_unauthenticated(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.add(stored("team-b", secret=OTHER))
    await store.revoke("team-a", clock())
    with pytest.raises(Unauthenticated, match="Incorrect API key"):
        await ring.authenticate(bearer(SECRET))


async def test_a_disabled_key_is_denied(ring: KeyRing, store: MemoryKeyStore) -> None:
    await store.add(stored("team-a", enabled=False))
    with pytest.raises(PermissionDenied) as info:
        await ring.authenticate(bearer(SECRET))
    assert info.value.code == "key_disabled"
    assert "'team-a'" in info.value.message
    assert error_response(info.value).status_code == 403
    assert error_body(info.value)["error"]["code"] == "key_disabled"


async def test_file_keys_need_no_store(store: MemoryKeyStore, clock: FakeClock) -> None:
    file_key = stored("from-file", priority="high")
    ring = KeyRing({file_key.secret_sha256: file_key}, store, cache_s=1.0, clock=clock)
    store.failing = True
    principal = await ring.authenticate(bearer(SECRET))
    assert principal.name == "from-file"
    assert principal.engine_priority == 0
    assert ring.file_names() == {"from-file"}
    with pytest.raises(Unauthenticated):  # auth is on, though the store has no keys
        await ring.authenticate(None)


async def test_a_revoked_key_is_trusted_until_the_cache_expires(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.add(stored("team-b", secret=OTHER))  # auth stays on after the revocation
    await ring.authenticate(bearer(SECRET))
    assert store.finds == 1
    await store.revoke("team-a", clock())
    clock.advance(0.9)
    assert (await ring.authenticate(bearer(SECRET))).name == "team-a"
    assert store.finds == 1  # answered from the cache
    clock.advance(0.1)
    with pytest.raises(Unauthenticated):
        await ring.authenticate(bearer(SECRET))
    assert store.finds == 2


async def test_unknown_keys_are_cached_too(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    with pytest.raises(Unauthenticated):
        await ring.authenticate(bearer(OTHER))
    await store.add(stored("team-b", secret=OTHER))
    clock.advance(0.5)
    with pytest.raises(Unauthenticated):
        await ring.authenticate(bearer(OTHER))
    clock.advance(0.5)
    assert (await ring.authenticate(bearer(OTHER))).name == "team-b"


async def test_forget_drops_cached_answers(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.add(stored("team-b", secret=OTHER))
    await ring.authenticate(bearer(SECRET))
    await store.revoke("team-a", clock())
    ring.forget()
    with pytest.raises(Unauthenticated):
        await ring.authenticate(bearer(SECRET))


async def test_revoking_the_last_key_keeps_auth_on(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await ring.authenticate(bearer(SECRET))
    await store.revoke("team-a", clock())
    clock.advance(1.0)
    with pytest.raises(Unauthenticated):
        await ring.authenticate(None)


async def test_once_keys_exist_the_store_is_not_counted_again(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    """Stored keys are revoked, never deleted, so "keys are required" never turns back: no
    store round trip per request for it (a request with a cached key costs no Redis call)."""
    await store.add(stored("team-a"))
    await ring.authenticate(bearer(SECRET))
    assert store.counts == 1
    for _ in range(3):
        clock.advance(10.0)
        assert (await ring.authenticate(bearer(SECRET))).name == "team-a"
        with pytest.raises(Unauthenticated):
            await ring.authenticate(None)
    assert store.counts == 1


async def test_the_first_key_turns_auth_on_within_the_cache_time(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    assert await ring.authenticate(None) == Principal(ANONYMOUS)
    await store.add(stored("team-a"))
    clock.advance(0.5)
    assert await ring.authenticate(None) == Principal(ANONYMOUS)
    clock.advance(0.5)
    with pytest.raises(Unauthenticated):
        await ring.authenticate(None)
    assert (await ring.authenticate(bearer(SECRET))).name == "team-a"


async def test_a_failing_store_serves_the_stale_answer(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.add(stored("team-b", secret=OTHER))
    await store.revoke("team-b", clock())
    await ring.authenticate(bearer(SECRET))
    with pytest.raises(Unauthenticated):
        await ring.authenticate(bearer(OTHER))
    store.failing = True
    clock.advance(60)
    assert (await ring.authenticate(bearer(SECRET))).name == "team-a"
    with pytest.raises(Unauthenticated):  # a stale "revoked" stays revoked
        await ring.authenticate(bearer(OTHER))


async def test_a_failing_store_without_an_answer_raises(
    ring: KeyRing, store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.add(stored("team-b", secret=OTHER))
    await ring.authenticate(bearer(SECRET))
    store.failing = True
    with pytest.raises(StoreFailure):  # never looked up: no answer to fall back on
        await ring.authenticate(bearer(OTHER))


async def test_a_store_failing_from_the_start_raises(ring: KeyRing, store: MemoryKeyStore) -> None:
    store.failing = True
    with pytest.raises(StoreFailure):
        await ring.authenticate(bearer(SECRET))


@pytest.mark.parametrize(("priority", "rank"), [("high", 0), ("normal", 1), ("low", 2)])
def test_engine_priority(priority: Priority, rank: int) -> None:
    principal = Principal("k", KeyPolicy(name="k", priority=priority))
    assert principal.priority == priority
    assert principal.engine_priority == rank


def test_anonymous_runs_at_normal_priority() -> None:
    assert Principal(ANONYMOUS).engine_priority == 1


async def test_an_expired_key_is_unauthenticated(store: MemoryKeyStore, clock: FakeClock) -> None:
    expiry = datetime.fromtimestamp(clock() + 60, UTC)
    await store.add(stored("team-a", expires_at=expiry.isoformat()))
    ring = KeyRing({}, store, cache_s=0.0, clock=clock, wall_clock=clock)
    assert (await ring.authenticate(bearer(SECRET))).name == "team-a"
    clock.advance(60)
    with pytest.raises(Unauthenticated) as info:
        await ring.authenticate(bearer(SECRET))
    assert info.value.code == "expired_api_key"
    assert "expired at" in info.value.message and SECRET not in info.value.message
    assert error_response(info.value).status_code == 401


async def test_a_rotated_out_secret_works_until_its_grace_ends(
    store: MemoryKeyStore, clock: FakeClock
) -> None:
    await store.add(stored("team-a"))
    await store.rotate("team-a", digest(OTHER), clock() + 300)
    ring = KeyRing({}, store, cache_s=0.0, clock=clock, wall_clock=clock)
    for secret in (SECRET, OTHER):
        assert (await ring.authenticate(bearer(secret))).name == "team-a"  # one identity
    clock.advance(300)
    with pytest.raises(Unauthenticated, match="Incorrect API key"):
        await ring.authenticate(bearer(SECRET))
    assert (await ring.authenticate(bearer(OTHER))).name == "team-a"


def test_keys_file_rotation_and_reload_with_audit_lines(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Editing the file changes keys without a restart: a new policy, a rotated secret (the
    old one listed with its end), a new key; each change is an audit line."""
    path = keys_file(
        tmp_path, f"keys:\n  - name: a\n    secret_sha256: {digest(SECRET)}\n    rpm: 5\n"
    )
    ring = KeyRing(load_keys_file(path), MemoryKeyStore(), cache_s=1.0, clock=clock, file_path=path)
    until = datetime.fromtimestamp(clock() + 3600, UTC).isoformat()
    path.write_text(
        f"keys:\n  - name: a\n    secret_sha256: {digest(OTHER)}\n    rpm: 9\n"
        f"    previous_secrets:\n      - secret_sha256: {digest(SECRET)}\n"
        f"        valid_until: '{until}'\n"
        f"  - name: b\n    secret_sha256: {digest('sk-sluice-b')}\n"
    )
    os.utime(path, (clock() + 5, clock() + 5))
    with caplog.at_level(logging.INFO, logger="sluice.audit"):
        ring.reload_file()  # within key_cache_s: not read yet
        assert {k.name for k in ring.file_keys.values()} == {"a"}
        clock.advance(1.0)
        ring.reload_file()
    by_secret = {sha: key for sha, key in ring.file_keys.items()}
    assert by_secret[digest(OTHER)].policy.rpm == 9
    assert by_secret[digest(SECRET)].revoked_at == pytest.approx(clock() + 3599, abs=2)
    audit = [r for r in caplog.records if r.name == "sluice.audit"]
    lines = [(r.action, r.key, r.actor) for r in audit]  # type: ignore[attr-defined]
    assert lines == [
        ("update", "a", "keys-file"),
        ("create", "b", "keys-file"),
        ("rotate", "a", "keys-file"),
    ]
    assert all(
        SECRET not in r.getMessage() and digest(SECRET) not in str(r.__dict__)
        for r in caplog.records
    )
    path.write_text("keys: [oops")  # an invalid edit: the keys loaded stay
    clock.advance(1.0)
    ring.reload_file(force=True)
    assert digest(OTHER) in ring.file_keys
