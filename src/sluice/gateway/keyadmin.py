"""Key administration shared by `sluice keys …` and the admin HTTP API.

Both manage the same stores the server reads: create (the secret is returned once), list,
revoke and usage. Keys from the keys file are listed but cannot be created or revoked here:
the file is their source of truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sluice.errors import Conflict, NotFound
from sluice.gateway.auth import KeyRing
from sluice.gateway.keys import KeyExists, KeyPolicy, StoredKey, digest, new_secret
from sluice.gateway.quota import QuotaStore, Usage


@dataclass(frozen=True)
class CreatedKey:
    key: StoredKey
    secret: str


def describe(key: StoredKey) -> dict[str, Any]:
    """A key as the API and CLI show it: its policy and history, never the digest."""
    return {
        **key.policy.model_dump(),
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
    def __init__(self, keys: KeyRing, quota: QuotaStore) -> None:
        self.keys = keys
        self.quota = quota

    async def create(self, policy: KeyPolicy) -> CreatedKey:
        if policy.name in self.keys.file_names():
            raise Conflict(f"The key '{policy.name}' is defined in the keys file.", param="name")
        secret = new_secret()
        key = StoredKey(policy=policy, secret_sha256=digest(secret))
        try:
            await self.keys.store.add(key)
        except KeyExists:
            raise Conflict(f"A key named '{policy.name}' already exists.", param="name") from None
        self.keys.forget()
        return CreatedKey(key, secret)

    async def list(self) -> list[StoredKey]:
        stored = await self.keys.store.all()
        return sorted([*self.keys.file_keys.values(), *stored], key=lambda k: k.name)

    async def revoke(self, name: str) -> None:
        if name in self.keys.file_names():
            raise Conflict(
                f"The key '{name}' is defined in the keys file; remove it there.", param="name"
            )
        if not await self.keys.store.revoke(name, time.time()):
            raise NotFound(f"No live key named '{name}'.", param="name")
        self.keys.forget()

    async def usage(self, name: str) -> Usage:
        known = {k.name for k in await self.list()}
        if name not in known:
            raise NotFound(f"No key named '{name}'.", param="name")
        return await self.quota.usage(name)
