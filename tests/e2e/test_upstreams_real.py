"""Upstream backends with real engines: a front sluice forwarding to the shared real sluice
server (vLLM engine, default model) and to vLLM's own OpenAI server on the same model.

Greedy answers through the front equal the upstream's own, chunk for chunk; usage is
captured and stripped as for any upstream; a client that leaves stops vLLM's request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sluice.config import DEFAULT_MODEL_NAME
from tests.e2e import prestart
from tests.e2e.prestart import VLLM_MODEL
from tests.e2e.server import SluiceProcess

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server on the default model; its `/v1` base URL."""
    process = prestart.take("vllm_server", tmp_path_factory)
    try:
        process.wait_ready()
        yield process.api
    finally:
        process.stop()


@pytest.fixture(scope="module")
def front(
    server: SluiceProcess, vllm_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SluiceProcess]:
    """A front (synthetic engine of its own) with `via-sluice` and `via-vllm` upstream."""
    logs = tmp_path_factory.mktemp("front-real")
    config = {
        "backends": [
            {
                "name": "sluice",
                "base_url": server.api,
                "models": {"via-sluice": DEFAULT_MODEL_NAME},
            },
            {"name": "vllm", "base_url": vllm_server, "models": {"via-vllm": VLLM_MODEL}},
        ]
    }
    (logs / "front.yaml").write_text(yaml.safe_dump(config))
    process = SluiceProcess(
        logs / "front.log", "--engine", "synthetic", "--config", str(logs / "front.yaml")
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]


def _deltas(chunks: list[dict[str, Any]]) -> list[Any]:
    return [[c["delta"] for c in chunk["choices"]] for chunk in chunks if chunk["choices"]]


@pytest.mark.parametrize(
    ("model", "upstream_model"), [("via-sluice", DEFAULT_MODEL_NAME), ("via-vllm", VLLM_MODEL)]
)
def test_greedy_answers_through_the_front_equal_the_upstreams(
    front: SluiceProcess,
    server: SluiceProcess,
    vllm_server: str,
    model: str,
    upstream_model: str,
) -> None:
    upstream = server.api if model == "via-sluice" else vllm_server
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    direct = httpx.post(
        f"{upstream}/chat/completions", json={**body, "model": upstream_model}, timeout=120
    ).json()
    proxied = httpx.post(
        f"{front.api}/chat/completions", json={**body, "model": model}, timeout=120
    )
    assert proxied.headers["x-sluice-model"] == model
    assert proxied.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    assert proxied.json()["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
    streamed = {**body, "stream": True}
    direct_chunks = _chunks(upstream, {**streamed, "model": upstream_model})
    proxied_chunks = _chunks(front.api, {**streamed, "model": model})
    assert _deltas(proxied_chunks) == _deltas(direct_chunks)
    assert all("usage" not in chunk for chunk in proxied_chunks)
    with_usage = _chunks(
        front.api, {**streamed, "model": model, "stream_options": {"include_usage": True}}
    )
    assert with_usage[-1]["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


def test_vllms_refusal_reaches_the_client_in_openais_shape(front: SluiceProcess) -> None:
    response = httpx.post(
        f"{front.api}/chat/completions",
        json={"model": "via-vllm", "messages": MESSAGES, "max_tokens": 4000},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "2048" in error["message"]  # vLLM's own words about its context length
    assert error["code"] is None or isinstance(error["code"], str)


def _vllm_running(vllm_server: str) -> float:
    text = httpx.get(vllm_server.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


def test_a_client_that_leaves_stops_vllms_request(front: SluiceProcess, vllm_server: str) -> None:
    body = {"model": "via-vllm", "messages": MESSAGES, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{front.api}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        for _ in range(8):
            next(lines)
        assert _vllm_running(vllm_server) == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _vllm_running(vllm_server) != 0:
        time.sleep(0.2)
    assert _vllm_running(vllm_server) == 0


def test_front_log_names_the_backend(front: SluiceProcess) -> None:
    response = httpx.post(
        f"{front.api}/chat/completions",
        json={"model": "via-sluice", "messages": MESSAGES, "max_tokens": 2},
        timeout=60,
    )
    request_id = response.headers["x-request-id"]
    for _ in range(50):
        lines = [
            json.loads(line)
            for line in Path(front.log_path).read_text().splitlines()
            if request_id in line and '"sluice.request"' in line
        ]
        if lines:
            break
        time.sleep(0.1)
    assert (lines[0]["backend"], lines[0]["model"], lines[0]["attempt"]) == (
        "sluice",
        "via-sluice",
        1,
    )
