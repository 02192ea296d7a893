"""`Annotated` dependency aliases: what routes may ask for, all read off `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sluice.api.run import JobRunner
from sluice.config import Settings
from sluice.engine.protocol import Engine
from sluice.lifecycle import Lifecycle


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


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
