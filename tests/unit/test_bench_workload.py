"""Workloads of `sluice bench`: length distributions, prompt files and arrival schedules."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from sluice.bench.workload import Arrival, Lengths, WorkloadError, shapes


def test_lengths_parse_fixed_and_uniform() -> None:
    assert Lengths.parse("32", what="x") == Lengths(32, 32)
    assert Lengths.parse("fixed:7", what="x") == Lengths(7, 7)
    assert Lengths.parse("uniform:16:128", what="x") == Lengths(16, 128)
    assert str(Lengths(16, 128)) == "uniform 16-128"


@pytest.mark.parametrize("text", ["", "0", "uniform:9:3", "uniform:5", "normal:3:4", "fixed:x"])
def test_lengths_refuse_bad_text(text: str) -> None:
    with pytest.raises(WorkloadError, match="--prompt-words"):
        Lengths.parse(text, what="--prompt-words")


def test_shapes_are_drawn_within_bounds_and_repeat_with_the_seed() -> None:
    drawn = shapes(200, prompt_words=Lengths(3, 9), output_tokens=Lengths(10, 20), seed=7)
    assert {len(s.prompt.split()) for s in drawn} == set(range(3, 10))
    assert {s.max_tokens for s in drawn} == set(range(10, 21))
    assert drawn == shapes(200, prompt_words=Lengths(3, 9), output_tokens=Lengths(10, 20), seed=7)
    assert drawn != shapes(200, prompt_words=Lengths(3, 9), output_tokens=Lengths(10, 20), seed=8)
    # Prompts of one length still differ, so a prefix cache cannot serve them all.
    fives = {s.prompt for s in drawn if len(s.prompt.split()) == 5}
    assert len(fives) > 1


def test_shapes_from_a_prompt_file_cycle_and_keep_their_own_max_tokens(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "alpha", "max_tokens": 5}) + "\n\n" + json.dumps({"prompt": "beta"})
    )
    drawn = shapes(5, prompt_words=Lengths(1, 1), output_tokens=Lengths(9, 9), prompts_file=path)
    assert [(s.prompt, s.max_tokens) for s in drawn] == [
        ("alpha", 5),
        ("beta", 9),
        ("alpha", 5),
        ("beta", 9),
        ("alpha", 5),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompts"),
        ("not json", "line 1 is not a JSON object"),
        ('{"text": "x"}', "line 1 is not a JSON object"),
        ('{"prompt": "a"}\n{"prompt": "b", "max_tokens": 0}', "line 2"),
        ('["prompt"]', "line 1"),
    ],
)
def test_bad_prompt_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        shapes(1, prompt_words=Lengths(1, 1), output_tokens=Lengths(1, 1), prompts_file=path)
    with pytest.raises(WorkloadError, match="Cannot read"):
        shapes(
            1,
            prompt_words=Lengths(1, 1),
            output_tokens=Lengths(1, 1),
            prompts_file=tmp_path / "missing.jsonl",
        )


def test_closed_loop_sends_everything_at_once() -> None:
    arrival = Arrival(concurrency=4)
    assert arrival.offsets(3) == [0.0, 0.0, 0.0]
    assert arrival.setting == 4
    assert arrival.label == "concurrency 4"


def _gaps(arrival: Arrival, count: int) -> list[float]:
    offsets = arrival.offsets(count, seed=3)
    return [b - a for a, b in itertools.pairwise(offsets)]


def test_poisson_gaps_have_the_rate_as_mean_and_unit_variation() -> None:
    gaps = _gaps(Arrival(rate=20.0), 20_000)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 20, rel=0.03)
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_bursty_gaps_keep_the_rate_but_vary_more() -> None:
    bursty = Arrival(rate=20.0, burstiness=0.25)
    gaps = _gaps(bursty, 20_000)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 20, rel=0.05)
    # A gamma of shape k has CV 1/sqrt(k): 2 at k = 0.25.
    assert statistics.stdev(gaps) / mean == pytest.approx(2.0, rel=0.1)
    assert bursty.label == "20 req/s bursty 0.25"
    assert Arrival(rate=5, concurrency=2).label == "5 req/s Poisson, at most 2 in flight"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"concurrency": 0}, {"rate": 0.0}, {"rate": 1.0, "burstiness": 0.0}],
)
def test_impossible_arrivals_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(WorkloadError):
        Arrival(**kwargs)  # type: ignore[arg-type]
