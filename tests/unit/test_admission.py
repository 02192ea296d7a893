"""Admission: shedding by priority on the engine's queue, Retry-After from the drain rate,
and the server-wide generation gate, on a fake engine count, clock and dice."""

from __future__ import annotations

import pytest

from sluice.config import AdmissionSettings
from sluice.engine.protocol import EngineStats
from sluice.errors import error_body, error_response
from sluice.gateway.admission import Admission, Overloaded
from sluice.gateway.keys import Priority
from tests.conftest import FakeClock


class Engine:
    """What the engine reports: `waiting` requests, or nothing (`None`) before it is ready."""

    def __init__(self) -> None:
        self.waiting: int | None = 0

    def stats(self) -> EngineStats | None:
        if self.waiting is None:
            return None
        return EngineStats(running=4, waiting=self.waiting, kv_cache_usage=0.5)


class Dice:
    """`chance()` always rolls `value`, and counts its rolls."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value
        self.rolls = 0

    def __call__(self) -> float:
        self.rolls += 1
        return self.value


@pytest.fixture
def engine() -> Engine:
    return Engine()


@pytest.fixture
def dice() -> Dice:
    return Dice()


def make(engine: Engine, clock: FakeClock, dice: Dice, **settings: object) -> Admission:
    return Admission(
        AdmissionSettings.model_validate(settings), engine.stats, clock=clock, chance=dice
    )


@pytest.fixture
def admission(engine: Engine, clock: FakeClock, dice: Dice) -> Admission:
    return make(engine, clock, dice, max_waiting=100)


def admitted(admission: Admission, priority: Priority) -> bool:
    try:
        admission.check(priority)
    except Overloaded:
        return False
    return True


# -- shedding ------------------------------------------------------------------------------


def test_no_caps_never_sheds(engine: Engine, clock: FakeClock, dice: Dice) -> None:
    admission = make(engine, clock, dice)
    engine.waiting = 10_000
    admission.queued(10**9)
    assert admission.load() == 0.0
    assert all(admitted(admission, p) for p in ("high", "normal", "low"))


def test_load_is_the_larger_share(engine: Engine, clock: FakeClock, dice: Dice) -> None:
    admission = make(engine, clock, dice, max_waiting=10, max_queued_tokens=1000)
    engine.waiting = 3
    admission.queued(500)
    assert admission.load() == pytest.approx(0.5)
    engine.waiting = 8
    assert admission.load() == pytest.approx(0.8)
    engine.waiting = None  # no figures from the engine yet: only the token share counts
    assert admission.load() == pytest.approx(0.5)


def test_normal_is_shed_at_capacity(admission: Admission, engine: Engine) -> None:
    engine.waiting = 99
    assert admitted(admission, "normal")
    engine.waiting = 100
    assert not admitted(admission, "normal")


def test_high_is_shed_only_past_the_headroom(admission: Admission, engine: Engine) -> None:
    engine.waiting = 149  # high_headroom defaults to 1.5 times the caps
    assert admitted(admission, "high")
    assert not admitted(admission, "normal")
    engine.waiting = 150
    assert not admitted(admission, "high")


def test_low_is_never_shed_below_low_shed_from(
    admission: Admission, engine: Engine, dice: Dice
) -> None:
    dice.value = 0.0  # the unluckiest roll there is
    engine.waiting = 70  # low_shed_from defaults to 0.7
    assert admitted(admission, "low")
    assert dice.rolls == 0  # no chance of a refusal, so no roll
    engine.waiting = 71
    assert not admitted(admission, "low")


@pytest.mark.parametrize(
    ("waiting", "low_admitted"),
    [(75, True), (80, True), (84, True), (86, False), (90, False), (99, False)],
)
def test_low_refusal_chance_rises_linearly(
    admission: Admission, engine: Engine, dice: Dice, waiting: int, low_admitted: bool
) -> None:
    # refused when the roll (0.5) is under (load - 0.7) / 0.3: past a load of 0.85
    engine.waiting = waiting
    assert admitted(admission, "low") is low_admitted
    assert dice.rolls == 1


def test_low_is_always_shed_at_capacity(admission: Admission, engine: Engine, dice: Dice) -> None:
    dice.value = 0.999
    engine.waiting = 99
    assert admitted(admission, "low")
    engine.waiting = 100
    assert not admitted(admission, "low")


def test_low_shed_from_is_configurable(engine: Engine, clock: FakeClock, dice: Dice) -> None:
    admission = make(engine, clock, dice, max_waiting=100, low_shed_from=0.5)
    dice.value = 0.5
    engine.waiting = 74  # (0.74 - 0.5) / 0.5 = 0.48
    assert admitted(admission, "low")
    engine.waiting = 76  # 0.52
    assert not admitted(admission, "low")


def test_queued_tokens_cap(engine: Engine, clock: FakeClock, dice: Dice) -> None:
    admission = make(engine, clock, dice, max_queued_tokens=1000)
    engine.waiting = 10_000  # no max_waiting: the engine's count does not matter
    admission.queued(600)
    admission.queued(399)
    assert admission.load() == pytest.approx(0.999)
    assert admitted(admission, "normal")
    admission.queued(1)
    assert not admitted(admission, "normal")
    assert admitted(admission, "high")
    admission.started(600)
    assert admission.queued_tokens == 400
    assert admitted(admission, "normal")
    admission.started(10_000)  # never below zero
    assert admission.queued_tokens == 0
    admission.queued(1500)
    assert not admitted(admission, "high")


def test_overloaded_is_a_503_with_retry_after(admission: Admission, engine: Engine) -> None:
    engine.waiting = 100
    with pytest.raises(Overloaded) as info:
        admission.check("normal")
    error = info.value
    assert "100%" in error.message and "normal priority" in error.message
    assert error.retry_after_s == 10.0  # nothing finished lately: no drain rate to go by
    response = error_response(error)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "10"
    assert error_body(error)["error"]["code"] == "overloaded"


# -- Retry-After from the drain rate -------------------------------------------------------


def test_retry_after_from_the_drain_rate(
    admission: Admission, engine: Engine, clock: FakeClock
) -> None:
    for _ in range(60):  # 60 finished in the last 30 s: 2 per second
        admission.finished()
        clock.advance(0.25)
    engine.waiting = 120  # load 1.2: 20 past the cap, plus this request
    with pytest.raises(Overloaded) as info:
        admission.check("normal")
    assert info.value.retry_after_s == 11  # ceil(21 / 2)
    engine.waiting = 200  # load 2: 100 past the cap, plus one
    with pytest.raises(Overloaded) as info:
        admission.check("high")
    assert info.value.retry_after_s == 51  # ceil(101 / 2)


def test_retry_after_is_capped_at_a_minute(
    admission: Admission, engine: Engine, clock: FakeClock
) -> None:
    for _ in range(6):  # 0.2 per second
        admission.finished()
    engine.waiting = 200
    with pytest.raises(Overloaded) as info:
        admission.check("high")
    assert info.value.retry_after_s == 60.0  # 101 / 0.2 = 505 s


@pytest.mark.parametrize(("finished", "retry"), [(1, 30.0), (3, 10.0), (15, 2.0), (60, 1.0)])
def test_retry_after_at_capacity(
    admission: Admission,
    engine: Engine,
    clock: FakeClock,
    finished: int,
    retry: float,
) -> None:
    for _ in range(finished):
        admission.finished()
    engine.waiting = 100  # exactly at capacity: one request's worth to drain
    assert admission.retry_after_s(admission.load()) == retry


def test_retry_after_counts_only_the_last_30_seconds(
    admission: Admission, clock: FakeClock
) -> None:
    for _ in range(30):
        admission.finished()
    assert admission.retry_after_s(1.0) == 1.0
    clock.advance(30)
    assert admission.retry_after_s(1.0) == 1.0  # 30 s ago still counts
    clock.advance(0.5)
    assert admission.retry_after_s(1.0) == 10.0  # no rate any more


def test_retry_after_stays_between_1_and_60(
    admission: Admission, engine: Engine, clock: FakeClock
) -> None:
    for _ in range(1000):
        admission.finished()
    engine.waiting = 100
    assert admission.retry_after_s(1.0) == 1.0  # 1 / 33 s, but never under a second
    engine.waiting = 10**6
    assert 1.0 <= admission.retry_after_s(10**4) <= 60.0


# -- the generation gate -------------------------------------------------------------------


@pytest.fixture
def gated(engine: Engine, clock: FakeClock, dice: Dice) -> Admission:
    return make(engine, clock, dice, gate_tokens_per_min=1000, gate_max_tokens=64)


def test_gate_open_below_the_limit(gated: Admission, clock: FakeClock) -> None:
    gated.generated(600)
    clock.advance(1)
    gated.generated(400)
    gated.generated(0)
    assert gated.generated_last_minute() == 1000
    assert not gated.gate_closed()  # at the limit, not past it
    assert gated.check("normal") is None
    assert gated.check("low") is None


def test_gate_closes_past_the_limit(gated: Admission, clock: FakeClock, dice: Dice) -> None:
    gated.generated(600)
    clock.advance(20)
    gated.generated(401)
    assert gated.gate_closed()
    assert gated.check("high") is None
    assert gated.check("normal") == 64
    dice.value = 0.999  # not a dice refusal: the gate refuses low outright
    with pytest.raises(Overloaded) as info:
        gated.check("low")
    assert "generation budget" in info.value.message
    assert 1.0 <= (info.value.retry_after_s or 0) <= 60.0


def test_gate_reopens_after_a_minute(gated: Admission, clock: FakeClock) -> None:
    gated.generated(1001)
    clock.advance(59.5)
    assert gated.check("normal") == 64
    clock.advance(0.5)
    assert gated.check("normal") is None
    assert gated.check("low") is None
    assert gated.generated_last_minute() == 0


def test_gate_forgets_old_tokens_one_by_one(gated: Admission, clock: FakeClock) -> None:
    gated.generated(500)
    clock.advance(30)
    gated.generated(300)
    gated.generated(300)  # same second: one entry
    assert gated.gate_closed()
    clock.advance(30)  # the first 500 are a minute old
    assert gated.generated_last_minute() == 600
    assert not gated.gate_closed()


def test_the_gate_is_off_by_default(admission: Admission) -> None:
    admission.generated(10**9)
    assert not admission.gate_closed()
    assert admission.check("low") is None
