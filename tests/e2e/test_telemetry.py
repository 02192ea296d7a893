"""Metrics and request logs of a real server: sluice's families and vLLM's in one scrape."""

from __future__ import annotations

import json

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess


def _samples(server: SluiceProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_metrics_cover_sluice_and_vllm_after_traffic(
    client: openai.OpenAI, server: SluiceProcess
) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        extra_headers={"x-request-id": "telemetry-e2e"},
    )
    samples = _samples(server)
    ok = [
        value
        for labels, value in samples["sluice_requests_total"]
        if labels
        == {"model": MODEL, "endpoint": "/v1/chat/completions", "status": "200", "key": "anonymous"}
    ]
    assert ok and ok[0] >= 1
    assert sum(value for _, value in samples["sluice_generation_tokens_total"]) >= 1
    assert any(value >= 1 for _, value in samples["sluice_time_to_first_token_seconds_count"])
    assert any(value >= 1 for _, value in samples["sluice_queue_time_seconds_count"])
    assert samples["sluice_model_load_seconds"][0][1] > 1
    # vLLM's own metrics arrive in the same scrape.
    assert "vllm:num_requests_running" in samples
    assert any(value > 0 for _, value in samples["vllm:generation_tokens_total"])

    lines = [line for line in server.log().splitlines() if "telemetry-e2e" in line]
    assert len(lines) == 1
    fields = json.loads(lines[0])
    assert fields["logger"] == "sluice.request"
    assert (fields["model"], fields["status"]) == (MODEL, 200)
    assert fields["completion_tokens"] >= 1


# Printed by vLLM's child processes when importing triton, before any logging config can
# apply (Python's last-resort handler); the one line that is not ours to format.
UNFORMATTABLE = ("Triton is installed, but doesn't include CPU backend",)


def test_the_server_log_is_json_lines_from_every_process(server: SluiceProcess) -> None:
    """Not a terminal: every line (sluice's, uvicorn's, vLLM's in the engine-core and worker
    processes) is one JSON object; no progress bars; vLLM's CPU advice is not a warning."""
    lines = [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if line.strip() and not line.startswith(UNFORMATTABLE)
    ]
    records = [json.loads(line) for line in lines]  # fails on any other line
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    from_children = [r for r in records if "pid" in r]
    assert any(r["logger"].startswith("vllm.v1.engine") for r in from_children)
    advice = [r for r in records if "LD_PRELOAD" in r["msg"]]
    assert advice and all(r["level"] == "info" for r in advice)
    # One line per request, sluice's own: uvicorn's access log would be a second.
    assert any(r["logger"] == "sluice.request" for r in records)
    assert not any(r["logger"] == "uvicorn.access" for r in records)
    assert not any("checkpoint shards" in r["msg"] for r in records)
