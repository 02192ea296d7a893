"""`sluice bench` end to end against a real server process (the synthetic engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.cli import main
from tests.e2e.server import SluiceProcess


@pytest.fixture
def synthetic_server(own_server_log: Path) -> Iterator[SluiceProcess]:
    server = SluiceProcess(
        own_server_log, "--engine", "synthetic", "--synthetic-tokens-per-s", "400"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_bench_reports_and_writes_records(
    synthetic_server: SluiceProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "bench",
            "--url",
            synthetic_server.api,
            "--requests",
            "20",
            "--concurrency",
            "4",
            "--max-tokens",
            "8",
            "--slo-latency",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed
    assert "goodput" in printed
    assert "100.0%" in printed
    data = json.loads((out / "records.json").read_text())
    assert data["model"] == "synthetic"
    assert len(data["records"]) == 20
    for record in data["records"]:
        assert record["status"] == 200
        assert record["error"] is None
        assert record["completion_tokens"] == 8
        assert len(record["chunk_times"]) == 8
        assert record["ttft"] <= record["latency"]


def test_bench_non_streaming_completions(synthetic_server: SluiceProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"p {i} q"}) for i in range(3)))
    out = tmp_path / "run"
    code = main(
        [
            "bench",
            "--url",
            synthetic_server.api,
            "--endpoint",
            "completions",
            "--no-stream",
            "--requests",
            "6",
            "--concurrency",
            "2",
            "--max-tokens",
            "4",
            "--prompts-file",
            str(prompts),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    records = json.loads((out / "records.json").read_text())["records"]
    assert [r["prompt_tokens"] for r in records] == [3] * 6
    assert all(r["completion_tokens"] == 4 for r in records)
