"""Admin HTTP API: `/admin/keys` to create, list, update (PATCH), rotate, revoke keys and read
their usage (every change is an audit line: gateway/keyadmin.py);
`/admin/lora` to list, load and unload LoRA adapters at run time (vLLM's own
`load_lora_adapter`/`unload_lora_adapter`, here behind the admin key instead of vLLM's
`VLLM_ALLOW_RUNTIME_LORA_UPDATING` switch).

Enabled by `gateway.admin_key`; every call needs `Authorization: Bearer <admin key>`
(compared in constant time). Without an admin key configured the routes answer 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, Strict
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

from sluice.api.deps import GatewayDep, ServingDep, SettingsDep
from sluice.errors import (
    Conflict,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
    from_vllm,
)
from sluice.gateway.keyadmin import (
    DEFAULT_GRACE_S,
    MAX_GRACE_S,
    KeyAdmin,
    describe,
    describe_usage,
)
from sluice.gateway.keys import KeyPolicy


async def _check_admin(request: Request, settings: SettingsDep) -> None:
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


async def _admin(
    request: Request, gateway: GatewayDep, _: Annotated[None, Depends(_check_admin)]
) -> KeyAdmin:
    client = request.client.host if request.client is not None else "unknown"
    return KeyAdmin(gateway.keys, gateway.quota, actor=f"admin-api:{client}")


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


class Rotation(BaseModel):
    """How long the old secret keeps working after a rotation."""

    model_config = ConfigDict(extra="forbid")

    grace_s: Annotated[float, Strict()] = Field(
        DEFAULT_GRACE_S,
        ge=0,
        le=MAX_GRACE_S,
        allow_inf_nan=False,
        description="seconds; 0 ends it at once",
    )


@router.patch("/keys/{name}")
async def update_key(name: str, changes: dict[str, Any], admin: AdminDep) -> dict[str, Any]:
    """Change a key's policy in place: the fields given (null clears a limit); the secret,
    the name and the spend stay."""
    return describe(await admin.update(name, changes))


@router.post("/keys/{name}/rotate")
async def rotate_key(
    name: str, admin: AdminDep, rotation: Rotation | None = None
) -> dict[str, Any]:
    """A new secret for the key, shown only now; the old one works for `grace_s` more."""
    grace_s = (rotation or Rotation()).grace_s
    created = await admin.rotate(name, grace_s)
    return {**describe(created.key), "secret": created.secret, "previous_valid_s": grace_s}


@router.delete("/keys/{name}")
async def revoke_key(name: str, admin: AdminDep) -> dict[str, Any]:
    await admin.revoke(name)
    return {"name": name, "revoked": True}


@router.get("/keys/{name}/usage")
async def key_usage(name: str, admin: AdminDep) -> dict[str, Any]:
    return describe_usage(await admin.usage(name))


@router.get("/lora", dependencies=[Depends(_check_admin)])
async def list_lora_adapters(serving: ServingDep) -> dict[str, Any]:
    """The LoRA adapters loaded now: their names (model ids) and where they came from."""
    adapters = serving.models.lora_requests.values()
    return {
        "object": "list",
        "data": [{"name": a.lora_name, "path": a.lora_path} for a in adapters],
    }


class LoadLoRABody(LoadLoRAAdapterRequest):  # type: ignore[misc]
    """vLLM's load request, unknown fields refused (as on every sluice body)."""

    model_config = ConfigDict(extra="forbid")


class UnloadLoRABody(UnloadLoRAAdapterRequest):  # type: ignore[misc]
    """vLLM's unload request, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")


@router.post("/lora/load", dependencies=[Depends(_check_admin)])
async def load_lora_adapter(body: LoadLoRABody, serving: ServingDep) -> dict[str, Any]:
    """Load an adapter from a folder on the server; it is then a model id (keys' model
    allowlists apply to it by name). 409 for a name already loaded (unless `load_inplace`);
    400 for an adapter the engine cannot load (no such folder, a rank over
    `--max-lora-rank`, a file instead of a folder): vLLM answers those 500."""
    if not body.load_inplace and body.lora_name in serving.models.lora_requests:
        raise Conflict(
            f"A LoRA adapter named '{body.lora_name}' is already loaded; unload it first, or "
            "set 'load_inplace' to reload it.",
            param="lora_name",
        )
    result = await serving.models.load_lora_adapter(body)
    if isinstance(result, ErrorResponse):
        engine = serving.models.engine_client
        if result.error.code >= 500 and not getattr(engine, "errored", False):
            raise InvalidRequest(
                f"The LoRA adapter at '{body.lora_path}' cannot be loaded: {result.error.message}",
                param="lora_path",
            )
        raise from_vllm(result.error.code, result.error.message, result.error.param)
    return {"name": body.lora_name, "loaded": True, "message": result}


@router.post("/lora/unload", dependencies=[Depends(_check_admin)])
async def unload_lora_adapter(body: UnloadLoRABody, serving: ServingDep) -> dict[str, Any]:
    result = await serving.models.unload_lora_adapter(body)
    if isinstance(result, ErrorResponse):
        raise from_vllm(result.error.code, result.error.message, result.error.param)
    return {"name": body.lora_name, "unloaded": True, "message": result}
