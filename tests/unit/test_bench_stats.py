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
