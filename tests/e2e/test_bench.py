"""`sluice bench` end to end against real server processes: the synthetic engine for the
report files, compare mode, sweeps, arrival rates and time limits, and the real vLLM server
for one short run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from sluice.cli import main
from tests.e2e.server import SluiceProcess


@pytest.fixture(scope="module")
def synthetic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    log = tmp_path_factory.mktemp("synthetic") / "sluice.log"
    server = SluiceProcess(log, "--engine", "synthetic", "--synthetic-tokens-per-s", "400")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_compare_sweep_writes_every_report_file(
    synthetic_server: SluiceProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    out = tmp_path / "run"
    api = synthetic_server.api
    code = main(
        [
            "bench",
            "--url",
            f"first={api}",
            "--url",
            f"second={api}",
            "--sweep",
            "1,4",
            "--rounds",
            "2",
            "--requests",
            "8",
            "--max-tokens",
            "8",
            "--prompt-words",
            "uniform:4:12",
            "--slo-latency",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed
    assert "first / second: output tokens/s" in printed
    assert "largest concurrency meeting it: 4 (every setting met it)" in printed

    records = _load(out / "records.json")
    assert records["model"] == "synthetic"
    # In turns: within each setting and round, first then second.
    order = [(r["setting"], r["round"], r["target"]) for r in records["runs"]]
    assert order == [(s, n, t) for s in (1.0, 4.0) for n in (1, 2) for t in ("first", "second")]
    for run in records["runs"]:
        assert len(run["records"]) == 8
        for record in run["records"]:
            assert record["status"] == 200
            assert record["error"] is None
            assert record["completion_tokens"] == 8
            assert 1 <= len(record["chunk_times"]) <= 8  # a lagging reader gets merged chunks
            # 4 to 12 words, plus the model's chat template around them (30 tokens)
            assert 4 + 30 <= record["prompt_tokens"] <= 3 * 12 + 30
            assert record["ttft"] <= record["latency"]

    summary = _load(out / "summary.json")
    assert summary["capacity"] == {
        "first": {"largest_meeting": 4.0, "first_missing": None},
        "second": {"largest_meeting": 4.0, "first_missing": None},
    }
    at_four = summary["settings"][1]
    assert at_four["load"] == "concurrency 4"
    assert at_four["targets"]["first"]["goodput"] == 1.0
    assert at_four["targets"]["first"]["ok"] == 16
    assert {r["figure"] for r in at_four["ratios"]["first / second"]} >= {"output tokens/s"}

    assert _png_size(out / "latency.png") == (1500, 450)
    assert _png_size(out / "sweep.png") == (1200, 450)


def test_open_loop_non_streaming_completions_from_a_prompt_file(
    synthetic_server: SluiceProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": f"p {i} q", "max_tokens": 2 + i}) for i in range(3))
    )
    out = tmp_path / "run"
    code = main(
        [
            "bench",
            "--url",
            synthetic_server.api,
            "--endpoint",
            "completions",
            "--no-stream",
            "--rate",
            "40",
            "--burstiness",
            "0.5",
            "--requests",
            "6",
            "--prompts-file",
            str(prompts),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    run = _load(out / "records.json")["runs"][0]
    assert run["load"] == "40 req/s bursty 0.5"
    records = run["records"]
    assert sorted(r["completion_tokens"] for r in records) == [2, 2, 3, 3, 4, 4]
    assert all(r["prompt_tokens"] == 4 for r in records)  # "p", " ", "0", " q"
    assert all(r["sent_at"] >= 0 for r in records)
    assert not (out / "sweep.png").exists()  # one setting: no sweep plot


def test_the_time_limit_stops_a_run(synthetic_server: SluiceProcess, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "bench",
            "--url",
            synthetic_server.api,
            "--concurrency",
            "2",
            "--requests",
            "50",
            "--max-tokens",
            "400",  # one second per request at 400 tokens/s
            "--time-limit",
            "1.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    run = _load(out / "records.json")["runs"][0]
    assert run["wall_s"] < 5
    assert 1 <= len(run["records"]) <= 4  # the rest were never sent or were cancelled
    synthetic_server.wait_idle()  # cancelled requests were aborted on the server too


def test_bench_against_the_real_engine(server: SluiceProcess, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "bench",
            "--url",
            server.api,
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--max-tokens",
            "8",
            "--slo-ttft",
            "60",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = _load(out / "summary.json")
    figures = summary["settings"][0]["targets"]["target"]
    assert figures["ok"] == 4
    assert figures["goodput"] == 1.0
    assert 0 < figures["ttft_s"]["p50"] <= figures["latency_s"]["p50"]
    for record in _load(out / "records.json")["runs"][0]["records"]:
        assert 1 <= record["completion_tokens"] <= 8
        assert len(record["chunk_times"]) >= 1
    assert _png_size(out / "latency.png") == (1500, 450)
