"""Bench reports on known inputs: medians over rounds, paired ratios, capacity, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sluice.bench.load import LoadResult, RequestRecord
from sluice.bench.report import (
    Objective,
    Report,
    Run,
    capacity,
    median_summary,
    paired_ratios,
    summarise,
)


def _result(latencies: list[float], tokens: int = 10, wall_s: float = 1.0) -> LoadResult:
    return LoadResult(
        records=[
            RequestRecord(
                status=200,
                ttft=lat / 2,
                latency=lat,
                completion_tokens=tokens,
                chunk_times=[lat / 2, lat],
            )
            for lat in latencies
        ],
        wall_s=wall_s,
    )


def test_summary_of_a_run() -> None:
    result = _result([0.1, 0.2, 0.3, 0.4, 0.5], tokens=10, wall_s=2.0)
    result.records.append(RequestRecord(status=429, latency=0.01, error="slow down"))
    summary = summarise(result, Objective(latency_s=0.35), (50, 95, 99))
    assert summary["requests"] == 6
    assert summary["errors"] == 1
    assert summary["errors_by_status"] == {"429": 1}
    assert summary["output_tokens_per_s"] == pytest.approx(25.0)
    assert summary["latency_s"]["p50"] == pytest.approx(0.3)
    assert summary["ttft_s"]["p95"] == pytest.approx(0.24)
    assert summary["itl_s"]["p50"] == pytest.approx(0.15)
    assert summary["goodput"] == pytest.approx(3 / 6)


def test_median_over_rounds_and_summed_errors() -> None:
    objective = Objective()
    runs = [summarise(_result([0.1, 0.1], wall_s=w), objective, (50, 95, 99)) for w in (1, 2, 4)]
    runs[2]["errors"] = 2
    runs[2]["errors_by_status"] = {"503": 2}
    merged = median_summary(runs)
    assert merged["output_tokens_per_s"] == pytest.approx(10.0)  # 20, 10, 5
    assert merged["errors"] == 2
    assert merged["errors_by_status"] == {"503": 2}
    assert merged["rounds"] == 3
    assert "goodput" not in merged


def test_paired_ratios_take_each_rounds_ratio() -> None:
    objective = Objective()
    # Round 1: a is twice as fast as b; round 2 (a noisier round for both): 1.5x.
    a = [summarise(_result([0.1], wall_s=w), objective, (50, 95, 99)) for w in (1.0, 2.0)]
    b = [summarise(_result([0.1], wall_s=w), objective, (50, 95, 99)) for w in (2.0, 3.0)]
    ratios = {r.figure: r for r in paired_ratios(a, b)}
    throughput = ratios["output tokens/s"]
    assert throughput.median == pytest.approx(1.75)
    assert (throughput.low, throughput.high) == (pytest.approx(1.5), pytest.approx(2.0))
    assert ratios["latency p50"].median == pytest.approx(1.0)


def _by_setting(p95s: dict[float, float], errors: int = 0) -> dict[float, dict[str, object]]:
    return {
        s: {"latency_s": {"p95": v}, "ttft_s": {"p95": v / 2}, "errors": errors}
        for s, v in p95s.items()
    }


def test_capacity_is_the_largest_setting_before_the_first_miss() -> None:
    objective = Objective(latency_s=1.0)
    assert capacity(_by_setting({1: 0.2, 4: 0.5, 16: 1.4, 32: 0.9}), objective) == (4, 16)
    assert capacity(_by_setting({1: 0.2, 4: 0.9}), objective) == (4, None)
    assert capacity(_by_setting({1: 1.2, 4: 0.9}), objective) == (None, 1)
    assert capacity(_by_setting({1: 0.2}, errors=1), objective) == (None, 1)
    ttft = Objective(ttft_s=0.3)
    assert capacity(_by_setting({1: 0.2, 4: 0.5, 16: 0.7}), ttft) == (4, 16)


def test_objective_uses_its_percentile() -> None:
    summary = {"latency_s": {"p95": 0.9, "p99": 1.1}, "ttft_s": {}, "errors": 0}
    assert Objective(latency_s=1.0).met_by(summary)
    assert not Objective(latency_s=1.0, percentile=99).met_by(summary)
    assert not Objective(ttft_s=1.0).met_by(summary)  # no TTFT measured: not met
    assert (
        str(Objective(latency_s=2, ttft_s=0.5, percentile=99))
        == "p99 latency ≤ 2 s and TTFT ≤ 0.5 s"
    )


def test_report_files(tmp_path: Path) -> None:
    runs = [
        Run(target, "http://x/v1", setting, f"concurrency {setting:g}", rnd, _result([lat]))
        for setting, lat in ((1.0, 0.2), (4.0, 2.0))
        for rnd in (1, 2)
        for target in ("a", "b")
    ]
    runs.append(Run("a", "http://x/v1", 8.0, "concurrency 8", 1, LoadResult([], 1.0)))
    report = Report(
        runs=runs,
        objective=Objective(latency_s=1.0),
        targets=["a", "b"],
        settings=[1.0, 4.0, 8.0],
        labels={1.0: "concurrency 1", 4.0: "concurrency 4", 8.0: "concurrency 8"},
    )
    files = report.write(tmp_path, {"model": "m"})
    records = json.loads(files["records"].read_text())
    assert records["model"] == "m"
    assert len(records["runs"]) == 9
    assert records["runs"][0]["records"][0]["latency"] == 0.2
    summary = json.loads(files["summary"].read_text())  # strict JSON: NaN became null
    assert summary["capacity"] == {
        "a": {"largest_meeting": 1.0, "first_missing": 4.0},
        "b": {"largest_meeting": 1.0, "first_missing": 4.0},
    }
    first = summary["settings"][0]
    assert first["targets"]["a"]["rounds"] == 2
    assert next(r["figure"] for r in first["ratios"]["a / b"]) == "output tokens/s"
    empty = summary["settings"][2]["targets"]["a"]
    assert empty["latency_s"]["p50"] is None
    assert "b" not in summary["settings"][2]["targets"]
    assert not math.isnan(first["targets"]["b"]["latency_s"]["p95"])
