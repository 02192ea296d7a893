"""Lifecycle: admission by phase, in-flight counting, drain, and failure."""

from __future__ import annotations

import asyncio

import pytest

from sluice.errors import Draining, EngineDead, ModelLoading, ServiceUnavailable, spec_for
from sluice.lifecycle import (
    DRAINING_RETRY_AFTER_S,
    LOADING_RETRY_AFTER_S,
    Lifecycle,
    Phase,
)


@pytest.fixture
def ready() -> Lifecycle:
    lifecycle = Lifecycle()
    lifecycle.loaded(1.5)
    return lifecycle


def test_starts_loading() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.phase is Phase.LOADING
    assert (lifecycle.in_flight, lifecycle.exit_code) == (0, 0)
    assert lifecycle.load_seconds is None
    assert not lifecycle.exit_requested.is_set()


def test_loaded_becomes_ready(ready: Lifecycle) -> None:
    assert ready.phase is Phase.READY
    assert ready.load_seconds == 1.5


def test_admit_and_release_count(ready: Lifecycle) -> None:
    ready.admit()
    ready.admit()
    assert ready.in_flight == 2
    ready.release()
    assert ready.in_flight == 1
    ready.release()
    assert ready.in_flight == 0


def test_release_never_goes_negative(ready: Lifecycle) -> None:
    ready.release()
    assert ready.in_flight == 0


@pytest.mark.parametrize(
    ("phase", "error", "code", "retry_after_s"),
    [
        (Phase.LOADING, ModelLoading, "model_loading", LOADING_RETRY_AFTER_S),
        (Phase.DRAINING, Draining, "draining", DRAINING_RETRY_AFTER_S),
        (Phase.DEAD, EngineDead, "engine_dead", LOADING_RETRY_AFTER_S),
    ],
)
def test_admit_refuses(
    phase: Phase, error: type[ServiceUnavailable], code: str, retry_after_s: float
) -> None:
    lifecycle = Lifecycle()
    lifecycle.phase = phase
    with pytest.raises(error) as info:
        lifecycle.admit()
    assert type(info.value) is error
    assert info.value.retry_after_s == retry_after_s
    assert spec_for(info.value).status == 503
    assert spec_for(info.value).code == code
    assert lifecycle.in_flight == 0


def test_retry_after_values() -> None:
    assert (LOADING_RETRY_AFTER_S, DRAINING_RETRY_AFTER_S) == (10.0, 5.0)


def test_loaded_after_drain_keeps_draining() -> None:
    lifecycle = Lifecycle()
    lifecycle.phase = Phase.DRAINING
    lifecycle.loaded(2.0)
    assert lifecycle.phase is Phase.DRAINING


async def test_drain_when_idle_returns_true_at_once(ready: Lifecycle) -> None:
    assert await asyncio.wait_for(ready.drain(timeout_s=5), timeout=1) is True
    assert ready.phase is Phase.DRAINING
    with pytest.raises(Draining):
        ready.admit()


async def test_drain_times_out_with_work_in_flight(ready: Lifecycle) -> None:
    ready.admit()
    assert await ready.drain(timeout_s=0.05) is False
    assert ready.phase is Phase.DRAINING
    assert ready.in_flight == 1


async def test_drain_waits_for_in_flight_work(ready: Lifecycle) -> None:
    ready.admit()
    ready.admit()
    drain = asyncio.create_task(ready.drain(timeout_s=5))
    await asyncio.sleep(0)
    ready.release()
    await asyncio.sleep(0.01)
    assert not drain.done()
    ready.release()
    assert await asyncio.wait_for(drain, timeout=1) is True


async def test_drain_during_loading() -> None:
    lifecycle = Lifecycle()
    assert await lifecycle.drain(timeout_s=1) is True
    assert lifecycle.phase is Phase.DRAINING


async def test_drain_of_a_dead_server_stays_dead(ready: Lifecycle) -> None:
    ready.fail("gone")
    await ready.drain(timeout_s=0.01)
    assert ready.phase is Phase.DEAD


def test_fail(ready: Lifecycle) -> None:
    ready.fail("engine exploded")
    assert ready.phase is Phase.DEAD
    assert ready.exit_code == 1
    assert ready.failure == "engine exploded"
    assert ready.exit_requested.is_set()
    with pytest.raises(EngineDead):
        ready.admit()


def test_fail_keeps_the_first_reason(ready: Lifecycle) -> None:
    ready.fail("first")
    ready.fail("second")
    assert ready.failure == "first"


def test_fail_while_draining(ready: Lifecycle) -> None:
    ready.phase = Phase.DRAINING
    ready.fail("boom")
    assert ready.phase is Phase.DEAD
    assert ready.exit_code == 1


def test_loaded_after_failure_stays_dead() -> None:
    lifecycle = Lifecycle()
    lifecycle.fail("start-up failed")
    lifecycle.loaded(1.0)
    assert lifecycle.phase is Phase.DEAD
