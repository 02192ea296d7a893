"""API tier: the real ASGI app with a fake engine, through Starlette's TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from sluice.app import create_app
from sluice.config import Settings
from tests.fake_engine import FakeEngine


def make_settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, model="fake", **overrides)  # type: ignore[call-arg]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return make_settings(limits={"max_tokens_cap": 64, "max_n": 4, "max_body_bytes": 4096})


@pytest.fixture
def client(engine: FakeEngine, settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, engine=engine)
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def wait_ready(test_client: TestClient) -> None:
    for _ in range(200):
        if test_client.get("/readyz").status_code == 200:
            return
        import time

        time.sleep(0.01)
    raise AssertionError("fake app never became ready")
