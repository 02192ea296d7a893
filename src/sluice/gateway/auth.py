"""Authentication: `Authorization: Bearer <key>` → `Principal`, from the keys file or a store.

`KeyRing` holds the keys file's keys (read once at start; the file is the source of truth
for them) and asks the `KeyStore` for the rest, trusting an answer for `key_cache_s`. With
no key anywhere, sluice runs open (every request is the `anonymous` principal, without
limits); the CLI then refuses to bind beyond loopback unless told it is fine. Creating the
first key turns authentication on within `key_cache_s`, without a restart.

The keys file:

    keys:
      - name: team-a
        secret_env: TEAM_A_KEY        # the secret from an environment variable (a Secret)
        rpm: 60
        tpm: 40000
      - name: batch
        secret_sha256: 9f86d0...      # or only its digest: printf %s "$KEY" | sha256sum
        priority: low
        budget_usd: 25
        budget_usd_window: month
        max_concurrent: 4
        expires_at: 2027-06-30T00:00:00Z
        previous_secrets:             # a rotation: the old secret works until valid_until
          - secret_sha256: 1b4f0e...
            valid_until: 2026-12-01T12:00:00Z

The server reads the file again when it changes (checked at most every `key_cache_s`), so
editing a policy, adding a key or rotating a secret there needs no restart; each key whose
entry changed gets an audit line (`actor: keys-file`). A file that became invalid is
refused with an error line and the keys already loaded stay in force.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sluice.errors import PermissionDenied, Unauthenticated
from sluice.gateway.keys import KeyPolicy, KeyStore, Priority, StoredKey, audit, digest
from sluice.gateway.quota import Clock

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
PRIORITY_RANK: dict[Priority, int] = {"high": 0, "normal": 1, "low": 2}


@dataclass(frozen=True)
class Principal:
    """Who is asking: a key's name and policy, or the anonymous user of an open server."""

    name: str
    policy: KeyPolicy | None = None

    @property
    def priority(self) -> Priority:
        return self.policy.priority if self.policy is not None else "normal"

    @property
    def engine_priority(self) -> int:
        """vLLM's priority value: lower runs first."""
        return PRIORITY_RANK[self.priority]


OPEN = Principal(ANONYMOUS)


class SecretSource(BaseModel):
    """Where a secret is: its digest, or an environment variable holding it."""

    model_config = ConfigDict(extra="forbid")

    secret_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    secret_env: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> SecretSource:
        if (self.secret_sha256 is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret_sha256 and secret_env")
        return self

    def resolve(self, path: Path, name: str) -> str:
        """The secret's digest; `KeysFile` if its variable is not set."""
        if self.secret_env is None:
            assert self.secret_sha256 is not None
            return self.secret_sha256.lower()
        secret = os.environ.get(self.secret_env)
        if not secret:
            raise KeysFile(
                f"keys file {path}: key '{name}' reads its secret from "
                f"${self.secret_env}, which is not set"
            )
        return digest(secret)


class PreviousSecret(SecretSource):
    """A rotated-out secret that keeps working until `valid_until`."""

    valid_until: AwareDatetime


class KeyFileEntry(KeyPolicy, SecretSource):
    """One key of the keys file: a policy, where its secret is, and rotated-out secrets."""

    model_config = ConfigDict(extra="forbid")

    previous_secrets: list[PreviousSecret] = Field(default_factory=list)


class KeysFile(Exception):
    """The keys file is missing or invalid (the message says where)."""


def load_keys_file(path: Path) -> dict[str, StoredKey]:
    """The keys of a keys file by secret digest; `KeysFile` with a clear reason if bad."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KeysFile(f"cannot read keys file {path}: {exc}") from exc
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise KeysFile(f"keys file {path} must hold a list under 'keys:'")
    keys: dict[str, StoredKey] = {}
    names: set[str] = set()
    for i, item in enumerate(entries):
        try:
            entry = KeyFileEntry.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            reason = str(first["msg"]).removeprefix("Value error, ")
            prefix = f"{where}: " if where else ""
            raise KeysFile(f"keys file {path}, key #{i + 1}: {prefix}{reason}") from exc
        if entry.name in names:
            raise KeysFile(f"keys file {path}: the name '{entry.name}' appears twice")
        names.add(entry.name)
        policy = KeyPolicy.model_validate(
            entry.model_dump(exclude={"secret_sha256", "secret_env", "previous_secrets"})
        )
        secrets: list[tuple[str, float | None]] = [(entry.resolve(path, entry.name), None)]
        for previous in entry.previous_secrets:
            until = previous.valid_until.timestamp()
            secrets.append((previous.resolve(path, entry.name), until))
        for sha, revoked_at in secrets:
            if sha in keys:
                raise KeysFile(
                    f"keys file {path}: keys '{keys[sha].name}' and '{entry.name}' have the "
                    "same secret"
                )
            keys[sha] = StoredKey(
                policy=policy, secret_sha256=sha, revoked_at=revoked_at, source="file"
            )
    return keys


def masked(secret: str) -> str:
    """What an error may echo of a wrong key, as OpenAI does: `sk-slu****wxyz`."""
    return f"{secret[:6]}****{secret[-4:]}" if len(secret) > 12 else "****"


def _stamp(path: Path | None) -> tuple[float, int] | None:
    """What tells a changed file: its modification time and size (None if absent)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


class KeyRing:
    """Looks keys up by secret, caching store answers; knows whether auth is on."""

    def __init__(
        self,
        file_keys: dict[str, StoredKey],
        store: KeyStore,
        cache_s: float,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        file_path: Path | None = None,
    ) -> None:
        self.file_keys = file_keys
        self.store = store
        self.cache_s = cache_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.file_path = file_path  # read again when it changes (module docstring)
        self._file_checked = clock()
        self._file_stamp = _stamp(file_path)
        self._cache: dict[str, tuple[StoredKey | None, float]] = {}
        self._stored_keys: tuple[int, float] | None = None

    def reload_file(self, force: bool = False) -> None:
        """Read the keys file again if it changed since it was read (checked at most every
        `cache_s` unless `force`); audit each key whose entry changed. An invalid file is
        logged and the keys already loaded stay."""
        if self.file_path is None:
            return
        now = self.clock()
        if not force and now - self._file_checked < self.cache_s:
            return
        self._file_checked = now
        stamp = _stamp(self.file_path)
        if stamp == self._file_stamp:
            return
        try:
            fresh = load_keys_file(self.file_path)
        except KeysFile as exc:
            logger.error("keys file not reloaded, the keys loaded before stay: %s", exc)
            return
        self._file_stamp = stamp
        before = {k.name: k.policy for k in self.file_keys.values() if k.revoked_at is None}
        after = {k.name: k.policy for k in fresh.values() if k.revoked_at is None}
        for name in sorted(before.keys() | after.keys()):
            old, new = before.get(name), after.get(name)
            if old != new:
                action = "create" if old is None else "revoke" if new is None else "update"
                audit("keys-file", action, name, old, new)
        secrets_before = {sha: k.name for sha, k in self.file_keys.items()}
        for sha, key in fresh.items():
            if sha not in secrets_before and key.name in before and key.revoked_at is None:
                audit("keys-file", "rotate", key.name, before[key.name], key.policy)
        self.file_keys = fresh
        self.forget()

    def file_names(self) -> set[str]:
        return {k.name for k in self.file_keys.values()}

    async def required(self) -> bool:
        """True once any key exists or existed (so every request must carry one)."""
        self.reload_file()
        if self.file_keys:
            return True
        if self._stored_keys is not None and self._stored_keys[0] > 0:
            return True  # stored keys are revoked, never deleted: once required, always
        now = self.clock()
        if self._stored_keys is None or now - self._stored_keys[1] >= self.cache_s:
            try:
                # Revoked keys count: revoking the last key must not open the server.
                self._stored_keys = (await self.store.count_all(), now)
            except Exception:
                if self._stored_keys is None:
                    raise
                # Keep the last answer while the store is away (fail-open or not, the
                # caller decides what a failed lookup of a key means).
        return self._stored_keys[0] > 0

    async def lookup(self, secret: str) -> StoredKey | None:
        sha = digest(secret)
        found = self.file_keys.get(sha)
        if found is not None:
            return found
        now = self.clock()
        cached = self._cache.get(sha)
        if cached is not None and now - cached[1] < self.cache_s:
            return cached[0]
        try:
            key = await self.store.find(sha)
        except Exception:
            if cached is not None:  # a stale answer beats none while the store is away
                return cached[0]
            raise
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[sha] = (key, now)
        return key

    def forget(self) -> None:
        """Drop cached answers (after a change through this process's admin API)."""
        self._cache.clear()
        self._stored_keys = None

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a request's `Authorization` header, or 401/403."""
        if not await self.required():
            return OPEN
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthenticated(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        key = await self.lookup(secret)
        now = self.wall_clock()
        if key is None or not key.valid_at(now):
            raise Unauthenticated(f"Incorrect API key provided: {masked(secret)}.")
        if not key.policy.enabled:
            raise PermissionDenied(f"The API key '{key.name}' is disabled.", code="key_disabled")
        if key.policy.expired(now):
            assert key.policy.expires_at is not None
            raise Unauthenticated(
                f"The API key '{key.name}' expired at {key.policy.expires_at.isoformat()}.",
                code="expired_api_key",
            )
        return Principal(key.name, key.policy)
