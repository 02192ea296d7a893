"""Fixtures shared by every tier: a hand-moved clock and a real Redis server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, redis_available

# 2026-03-10T12:00:00Z: the start of an hour, mid-day, mid-month.
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()


class FakeClock:
    """A clock only tests move: `clock()` is the time, `advance(s)` moves it on."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh `redis-server` on a free port, with its data under `tmp_path`."""
    if not redis_available():
        message = "redis-server is not installed (scripts/test.sh installs it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI must run the Redis tests, never skip them
        pytest.skip(message)
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _early_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Start the slow end-to-end servers the selected tests need now, at the session's first
    test, so they come up while the faster tiers run (tests/e2e/prestart.py;
    `SLUICE_TEST_PRESTART=0` starts each where its tests begin)."""
    items = request.session.items
    e2e = any(item.get_closest_marker("e2e") for item in items)  # tests/e2e/conftest.py
    if not e2e or os.environ.get("SLUICE_TEST_PRESTART") == "0":
        yield
        return
    from tests.e2e import prestart  # imports torch: only when end-to-end tests run

    prestart.begin(items, tmp_path_factory)
    try:
        yield
    finally:
        prestart.stop_untaken()
