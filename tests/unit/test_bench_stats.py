"""Benchmark statistics on known inputs."""

from __future__ import annotations

import math

import pytest

from sluice.bench.load import LoadResult, RequestRecord
from sluice.bench.stats import inter_token_latencies, percentile


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_inter_token_latencies_from_known_timestamps() -> None:
    assert inter_token_latencies([0.5, 0.6, 0.8, 1.1]) == pytest.approx([0.1, 0.2, 0.3])
    assert inter_token_latencies([0.5]) == []


def test_load_result_counts_only_successful_requests() -> None:
    records = [
        RequestRecord(
            status=200, ttft=0.2, latency=1.0, completion_tokens=10, chunk_times=[0.2, 0.3]
        ),
        RequestRecord(
            status=200, ttft=0.4, latency=2.0, completion_tokens=30, chunk_times=[0.4, 0.7]
        ),
        RequestRecord(status=503, latency=0.01, error="overloaded"),
    ]
    result = LoadResult(records=records, wall_s=2.0)
    assert len(result.ok) == 2
    assert result.output_tokens_per_s == pytest.approx(20.0)
    assert result.ttft(50) == pytest.approx(0.3)
    assert result.itl(50) == pytest.approx(0.2)
    assert result.latency(100) == pytest.approx(2.0)


def test_goodput_and_errors_by_status() -> None:
    records = [
        RequestRecord(status=200, ttft=0.1, latency=0.5),
        RequestRecord(status=200, ttft=0.9, latency=2.0),
        RequestRecord(status=200, ttft=0.2, latency=0.6, error="stream broke"),
        RequestRecord(status=429, latency=0.01, error="slow down"),
    ]
    result = LoadResult(records=records, wall_s=1.0)
    assert result.errors_by_status() == {"200": 1, "429": 1}
    assert result.goodput(max_latency_s=1.0) == pytest.approx(1 / 4)
    assert result.goodput(max_ttft_s=1.0) == pytest.approx(2 / 4)
    assert result.goodput() == pytest.approx(2 / 4)
    assert result.requests_per_s == pytest.approx(2.0)


def test_bench_refuses_a_bad_prompts_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sluice.cli import main

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    code = main(
        ["bench", "--model", "m", "--prompts-file", str(bad), "--url", "http://127.0.0.1:9/v1"]
    )
    assert code == 2
    assert "line 2" in capsys.readouterr().err
