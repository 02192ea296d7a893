"""Admin HTTP API: `/admin/keys` to create, list, revoke keys and read their usage.

Enabled by `gateway.admin_key`; every call needs `Authorization: Bearer <admin key>`
(compared in constant time). Without an admin key configured the routes answer 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from sluice.api.deps import GatewayDep, SettingsDep
from sluice.errors import PermissionDenied, Unauthenticated
from sluice.gateway.keyadmin import KeyAdmin, describe, describe_usage
from sluice.gateway.keys import KeyPolicy


def _admin(request: Request, settings: SettingsDep, gateway: GatewayDep) -> KeyAdmin:
    admin_key = settings.gateway.admin_key
    if admin_key is None:
        raise PermissionDenied(
            "The admin API is disabled; set gateway.admin_key (SLUICE_GATEWAY__ADMIN_KEY).",
            code="admin_disabled",
        )
    sent = request.headers.get("authorization", "")
    expected = f"Bearer {admin_key.get_secret_value()}"
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Unauthenticated("The admin API needs 'Authorization: Bearer <admin key>'.")
    return KeyAdmin(gateway.keys, gateway.quota)


AdminDep = Annotated[KeyAdmin, Depends(_admin)]
router = APIRouter(prefix="/admin")


@router.get("/keys")
async def list_keys(admin: AdminDep) -> dict[str, Any]:
    return {"object": "list", "data": [describe(k) for k in await admin.list()]}


@router.post("/keys", status_code=201)
async def create_key(policy: KeyPolicy, admin: AdminDep) -> dict[str, Any]:
    """Create a key; the response holds its secret, which is never shown again."""
    created = await admin.create(policy)
    return {**describe(created.key), "secret": created.secret}


@router.delete("/keys/{name}")
async def revoke_key(name: str, admin: AdminDep) -> dict[str, Any]:
    await admin.revoke(name)
    return {"name": name, "revoked": True}


@router.get("/keys/{name}/usage")
async def key_usage(name: str, admin: AdminDep) -> dict[str, Any]:
    return describe_usage(await admin.usage(name))
