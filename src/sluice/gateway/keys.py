"""API keys: what a key may do (`KeyPolicy`), how its secret is kept, and the store seam.

A secret is `sk-sluice-` plus 43 random URL-safe characters (256 bits). Only its SHA-256
is stored: for secrets this random a slow password hash buys nothing (the same choice as
GitHub's and Stripe's tokens), and a digest lets the store find a key by it. The digest
found is compared again with `hmac.compare_digest`, and the secret itself is returned once,
by `new_secret`, and never logged.

Keys come from two places: the declarative keys file (`keys_file.py`, read-only to the API)
and a `KeyStore` (SQLite or Redis) written by `sluice keys` and the admin API. A key's name
is its identity for limits, budgets, metrics and logs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Literal, Protocol

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

Priority = Literal["high", "normal", "low"]
Window = Literal["hour", "day", "month"]

SECRET_PREFIX = "sk-sluice-"
AUDIT_LOGGER = "sluice.audit"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Counts go into Redis's Lua (doubles) and the SQLite store: at most 2^53, the largest
# integer a double holds exactly (JavaScript's Number.MAX_SAFE_INTEGER is 2^53 - 1).
MAX_COUNT = 1 << 53
MAX_USD = 1e12
# JSON's own types only: no "5" for 5, no true for 1, no 5.0 for an integer (pydantic's lax
# mode would take each of them, and "off" as false).
Count = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT)]
Flag = Annotated[bool, Strict()]


class KeyPolicy(BaseModel):
    """A key's settings; `None` limits mean "no limit"."""

    # No infinities: JSON would store them as null (a budget or an end that silently vanishes).
    # A number for `expires_at` is epoch seconds (pydantic would guess milliseconds past 2e10).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, val_temporal_unit="seconds")

    name: str = Field(pattern=NAME_PATTERN, description="identity in limits, metrics and logs")
    enabled: Flag = True
    models: list[Annotated[str, Strict()]] | None = Field(
        None, description="allowed model ids, without spaces ([] = none); None = all"
    )
    rpm: Count | None = Field(None, description="requests per minute")
    tpm: Count | None = Field(None, description="tokens per minute (prompt + completion)")
    max_tokens: Count | None = Field(None, description="largest max_tokens per choice")
    budget_tokens: Count | None = Field(None, description="tokens per budget window")
    budget_tokens_window: Window = "month"
    budget_usd: Annotated[float, Strict()] | None = Field(
        None, gt=0, le=MAX_USD, description="USD per budget window"
    )
    budget_usd_window: Window = "month"
    priority: Priority = "normal"
    max_concurrent: Count | None = Field(
        None, description="requests in flight at once (across replicas on Redis)"
    )
    expires_at: AwareDatetime | None = Field(
        None, description="when the key stops working (ISO 8601 with a zone); None = never"
    )

    @field_validator("models")
    @classmethod
    def _each_model_once(cls, models: list[str] | None) -> list[str] | None:
        # A check here rather than a `pattern` in the schema: schemathesis cannot negate a
        # pattern nested in an array inside `anyOf` (the API tier's fuzzing).
        if models is None:
            return None
        if any(not model or model != "".join(model.split()) for model in models):
            raise ValueError("a model id is not empty and has no spaces")
        return list(dict.fromkeys(models))

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float) -> bool:
        """Whether the key has expired at `now` (epoch seconds)."""
        return self.expires_at is not None and self.expires_at.timestamp() <= now


class StoredKey(BaseModel):
    """A key as a store keeps it: the policy, the secret's digest and its history."""

    # No infinities: JSON would store them as null (a budget or an end that silently vanishes).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    policy: KeyPolicy
    secret_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None  # may lie ahead: a rotated-out secret's grace period
    source: Literal["store", "file"] = "store"

    @property
    def name(self) -> str:
        return self.policy.name

    def valid_at(self, now: float) -> bool:
        """Not revoked at `now` (epoch seconds); expiry and `enabled` are the policy's."""
        return self.revoked_at is None or self.revoked_at > now

    @model_validator(mode="after")
    def _lowercase(self) -> StoredKey:
        self.secret_sha256 = self.secret_sha256.lower()
        return self


def audit(
    actor: str, action: str, name: str, before: KeyPolicy | None, after: KeyPolicy | None
) -> None:
    """One audit line for a change to a key: who, what, and its policy before and after
    (never a secret or a digest)."""
    logging.getLogger(AUDIT_LOGGER).info(
        "key %s",
        action,
        extra={
            "actor": actor,
            "action": action,
            "key": name,
            "before": before.model_dump(mode="json") if before is not None else None,
            "after": after.model_dump(mode="json") if after is not None else None,
        },
    )


def new_secret() -> str:
    """A fresh API key secret (shown to its owner once)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, key: StoredKey) -> bool:
    """Constant-time check that `secret` is `key`'s."""
    return hmac.compare_digest(digest(secret), key.secret_sha256)


PolicyChange = Callable[[KeyPolicy], KeyPolicy]


class KeyExists(Exception):
    """A key with this name already exists."""


class KeyStore(Protocol):
    """Where keys created at run time live (SQLite embedded, or Redis for replicas)."""

    async def find(self, secret_sha256: str) -> StoredKey | None:
        """The key with this digest, revoked or not; `None` if unknown."""
        ...

    async def add(self, key: StoredKey) -> None:
        """Store a new key; `KeyExists` if an unrevoked key has its name."""
        ...

    async def all(self) -> list[StoredKey]:
        """Every key, revoked ones included, by name."""
        ...

    async def revoke(self, name: str, at: float) -> StoredKey | None:
        """Revoke the live key called `name` and every rotated-out secret of it still in its
        grace, in one transaction; the live key as it was, or None if there is none."""
        ...

    async def update(self, name: str, change: PolicyChange) -> tuple[StoredKey, KeyPolicy] | None:
        """Give the live key called `name` the policy `change` makes of its current one, read
        and written in one transaction (concurrent changes do not overwrite each other), and
        its rotated-out secrets still in their grace too. The live key as it was and the new
        policy, or None if there is no live key by that name. What `change` raises propagates
        and nothing changes."""
        ...

    async def rotate(
        self, name: str, secret_sha256: str, old_until: float
    ) -> tuple[StoredKey, StoredKey] | None:
        """Make a key with this digest and the current policy the live key called `name`, in
        one transaction; the old secret stays valid until `old_until` (its `revoked_at`).
        The old key as it was and the new one, or None if there is no live key by that name
        (then nothing changes)."""
        ...

    async def count_live(self) -> int:
        """How many unrevoked keys there are."""
        ...

    async def count_all(self) -> int:
        """How many keys were ever stored, revoked ones included."""
        ...

    async def close(self) -> None: ...
