"""API tier: the real ASGI app with a fake engine, through Starlette's TestClient."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sluice.app import create_app
from sluice.config import Settings
from sluice.gateway.service import Gateway
from sluice.lifecycle import Lifecycle
from tests.api.openai_schema import assert_matches
from tests.fake_engine import MODEL_ID, FakeEngine

API_LIMITS = {"max_tokens_cap": 64, "max_n": 4, "max_body_bytes": 4096}


def make_settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, model="fake", **overrides)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _no_sluice_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read SLUICE_* variables; the developer's shell must not change these tests.
    The embedded store's database goes to a fresh folder per test."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return make_settings(limits=dict(API_LIMITS))


@pytest.fixture
def client(engine: FakeEngine, settings: Settings) -> Iterator[TestClient]:
    with app_client(engine, settings) as test_client:
        yield test_client
        # Whatever a test did, nothing may stay counted in flight or running in the engine.
        assert_settled(test_client, engine)


@contextlib.contextmanager
def app_client(
    engine: FakeEngine, settings: Settings, *, wait: bool = True
) -> Iterator[TestClient]:
    """A TestClient on a fresh app (lifespan running); `wait=False` skips waiting for ready."""
    app = create_app(settings, engine=engine)
    with TestClient(app) as test_client:
        if wait:
            wait_ready(test_client)
        yield test_client


def wait_ready(test_client: TestClient) -> None:
    for _ in range(200):
        if test_client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("fake app never became ready")


def lifecycle_of(test_client: TestClient) -> Lifecycle:
    lifecycle: Lifecycle = test_client.app.state.lifecycle  # type: ignore[attr-defined]
    return lifecycle


def assert_settled(test_client: TestClient, engine: FakeEngine) -> None:
    """No request counted in flight, no engine request left running."""
    assert lifecycle_of(test_client).in_flight == 0
    gateway: Gateway = test_client.app.state.gateway  # type: ignore[attr-defined]
    assert gateway.admission.queued_tokens == 0
    assert engine.active == set()


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "prompt": "one two three", "max_tokens": 3, **fields}


def chat_body(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 3,
        **fields,
    }


def assert_error(
    response: Any,
    status: int,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """`response` is OpenAI's error shape with exactly these fields; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_matches(body, "ErrorResponse")
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == type_
    assert error["param"] == param
    assert error["code"] == code
    return error
