"""`Annotated` dependency aliases: what routes may ask for, all read off the app's state.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread,
a thread hop per dependency per request for what is an attribute read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from opentelemetry import trace

from sluice.api.serving import Serving
from sluice.config import Settings
from sluice.engine.protocol import Engine
from sluice.errors import EngineDead, ModelLoading
from sluice.gateway.auth import Principal
from sluice.gateway.service import Gateway
from sluice.lifecycle import LOADING_RETRY_AFTER_S, Lifecycle, Phase
from sluice.telemetry.record import record_of


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _tracer(request: Request) -> trace.Tracer:
    tracer: trace.Tracer = request.app.state.tracer
    return tracer


async def _serving(request: Request) -> Serving:
    """vLLM's serving objects; 503 until the engine has loaded (or after it died)."""
    return serving_of(request.app.state)


def serving_of(state: Any) -> Serving:
    """`state.serving`, or 503 `model_loading` / `engine_dead` while there is none."""
    serving: Serving | None = state.serving
    if serving is None:
        lifecycle: Lifecycle = state.lifecycle
        if lifecycle.phase is Phase.DEAD:
            raise EngineDead(
                "The inference engine has failed and the server is restarting.",
                retry_after_s=LOADING_RETRY_AFTER_S,
            )
        raise ModelLoading(
            "The model is still loading. Retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S
        )
    return serving


async def _principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer`; 401/403 before the body is looked at."""
    gateway: Gateway = request.app.state.gateway
    principal = await gateway.authenticate(request.headers.get("authorization"))
    record = record_of(request.scope)
    if record is not None:
        record.key_name = principal.name
    return principal


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]
GatewayDep = Annotated[Gateway, Depends(_gateway)]
TracerDep = Annotated[trace.Tracer, Depends(_tracer)]
ServingDep = Annotated[Serving, Depends(_serving)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
