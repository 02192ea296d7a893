"""Key administration shared by `sluice keys …` and the admin HTTP API.

Both manage the same stores the server reads: create (the secret is returned once), list,
update a policy in place, rotate a secret (the old one stays valid for a grace period),
revoke and usage. Keys from the keys file are listed but cannot be changed here: the file is
their source of truth.

Every change writes one audit line (logger `sluice.audit`): who (`actor`: the admin API and
the caller's address, or the CLI and the OS user), what (`action`, `key`), and the policy
before and after. Never a secret or its digest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sluice.errors import Conflict, InvalidRequest, NotFound, SluiceError
from sluice.gateway.auth import KeyRing
from sluice.gateway.keys import KeyExists, KeyPolicy, StoredKey, audit, digest, new_secret
from sluice.gateway.quota import QuotaStore, Usage

DEFAULT_GRACE_S = 3600.0  # how long a rotated-out secret keeps working, unless told
MAX_GRACE_S = 365 * 86400.0


@dataclass(frozen=True)
class CreatedKey:
    key: StoredKey
    secret: str


def describe(key: StoredKey) -> dict[str, Any]:
    """A key as the API and CLI show it: its policy and history, never the digest."""
    return {
        **key.policy.model_dump(mode="json"),
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "source": key.source,
    }


def describe_usage(usage: Usage) -> dict[str, Any]:
    return {
        "name": usage.key,
        "windows": {
            w.window: {"start": w.start, "end": w.end, "tokens": w.tokens, "usd": w.usd}
            for w in usage.windows
        },
        "reserved": {"tokens": usage.reserved_tokens, "usd": usage.reserved_usd},
    }


class KeyAdmin:
    """The key operations, on the ring's store and the quota store, as `actor`."""

    def __init__(self, keys: KeyRing, quota: QuotaStore, actor: str = "unknown") -> None:
        self.keys = keys
        self.quota = quota
        self.actor = actor

    def _audit(
        self, action: str, name: str, before: KeyPolicy | None, after: KeyPolicy | None
    ) -> None:
        audit(self.actor, action, name, before, after)

    def _in_file(self, name: str, what: str) -> Conflict | None:
        """The 409 for a change to a key the keys file defines, or None."""
        if name not in self.keys.file_names():
            return None
        return Conflict(
            f"The key '{name}' is defined in the keys file; {what} it there.", param="name"
        )

    def _missing(self, name: str, what: str) -> SluiceError:
        """The error for a change the store found no live key for: `Conflict` when the name
        is the keys file's (the store is tried first: a stored key that shares its name with
        a file key added later must stay manageable), else `NotFound`."""
        return self._in_file(name, what) or NotFound(f"No live key named '{name}'.", param="name")

    async def create(self, policy: KeyPolicy) -> CreatedKey:
        """Store a new key with `policy`: `Conflict` for a taken name, `InvalidRequest` for a
        policy that has already expired (the key could never be used)."""
        if conflict := self._in_file(policy.name, "change"):
            raise conflict
        if policy.expired(time.time()):
            raise InvalidRequest(
                "expires_at is in the past: the key would never work.", param="expires_at"
            )
        secret = new_secret()
        key = StoredKey(policy=policy, secret_sha256=digest(secret))
        try:
            await self.keys.store.add(key)
        except KeyExists:
            raise Conflict(f"A key named '{policy.name}' already exists.", param="name") from None
        self.keys.forget()
        self._audit("create", policy.name, None, policy)
        return CreatedKey(key, secret)

    async def list(self) -> list[StoredKey]:
        stored = await self.keys.store.all()
        return sorted([*self.keys.file_keys.values(), *stored], key=lambda k: k.name)

    async def update(self, name: str, changes: dict[str, Any]) -> StoredKey:
        """Change fields of the live key's policy in place (None clears a limit); the secret,
        the name and the spend stay. The fields apply to the policy as the store holds it in
        the same transaction. `InvalidRequest` for a bad field, `NotFound`."""
        if "name" in changes and changes["name"] != name:
            raise InvalidRequest("A key's name cannot change; create a new key.", param="name")

        def change(current: KeyPolicy) -> KeyPolicy:
            try:
                return KeyPolicy.model_validate({**current.model_dump(), **changes, "name": name})
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise InvalidRequest(f"{field}: {first['msg']}", param=field) from None

        result = await self.keys.store.update(name, change)
        if result is None:
            raise self._missing(name, "edit")
        before, policy = result
        self.keys.forget()
        self._audit("update", name, before.policy, policy)
        return before.model_copy(update={"policy": policy})

    async def rotate(self, name: str, grace_s: float) -> CreatedKey:
        """A new secret for the live key called `name` (same policy, limits and spend); the
        old secret keeps working for `grace_s` seconds."""
        if not 0 <= grace_s <= MAX_GRACE_S:  # NaN fails both
            raise InvalidRequest(
                f"grace_s must be between 0 and {MAX_GRACE_S:.0f} seconds.", param="grace_s"
            )
        secret = new_secret()
        result = await self.keys.store.rotate(name, digest(secret), time.time() + grace_s)
        if result is None:
            raise self._missing(name, "rotate")
        before, new = result
        self.keys.forget()
        self._audit("rotate", name, before.policy, new.policy)
        return CreatedKey(new, secret)

    async def revoke(self, name: str) -> None:
        """Revoke the key: its live secret and any rotated-out one still in its grace."""
        before = await self.keys.store.revoke(name, time.time())
        if before is None:
            raise self._missing(name, "remove")
        self.keys.forget()
        self._audit("revoke", name, before.policy, None)

    async def usage(self, name: str) -> Usage:
        known = {k.name for k in await self.list()}
        if name not in known:
            raise NotFound(f"No key named '{name}'.", param="name")
        return await self.quota.usage(name)
