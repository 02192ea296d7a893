"""`Annotated` dependency aliases: what routes may ask for, all read off `app.state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from sluice.api.run import JobRunner
from sluice.config import Settings
from sluice.engine.protocol import Engine
from sluice.gateway.auth import Principal
from sluice.gateway.service import Gateway
from sluice.lifecycle import Lifecycle
from sluice.telemetry.record import record_of


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


def _runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.runner
    return runner


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


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
RunnerDep = Annotated[JobRunner, Depends(_runner)]
GatewayDep = Annotated[Gateway, Depends(_gateway)]
PrincipalDep = Annotated[Principal, Depends(_principal)]


@dataclass(frozen=True)
class Generation:
    """Everything a generation route needs, resolved once (the key before the body)."""

    request: Request
    principal: PrincipalDep
    settings: SettingsDep
    engine: EngineDep
    lifecycle: LifecycleDep
    runner: RunnerDep
    gateway: GatewayDep


GenerationDep = Annotated[Generation, Depends()]
