"""Draining: not ready, new generation refused with 503 draining, in-flight work finishes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sluice.lifecycle import Phase
from tests.api.conftest import (
    assert_error,
    assert_settled,
    chat_body,
    completion_body,
    lifecycle_of,
)
from tests.fake_engine import FakeEngine


def portal(client: TestClient) -> Any:
    assert client.portal is not None
    return client.portal


def test_draining_refuses_new_work(client: TestClient, engine: FakeEngine) -> None:
    lifecycle = lifecycle_of(client)
    assert portal(client).call(lifecycle.drain, 1.0) is True  # idle: done at once
    assert lifecycle.phase is Phase.DRAINING

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    assert "retry-after" in ready.headers
    assert client.get("/healthz").status_code == 200  # still alive: do not restart it

    for path, body in [
        ("/v1/completions", completion_body()),
        ("/v1/chat/completions", chat_body(stream=True)),
    ]:
        response = client.post(path, json=body)
        assert_error(response, 503, type_="server_error", code="draining")
        assert response.headers["retry-after"] == "5"
    assert engine.requests == []
    assert lifecycle.in_flight == 0


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(token_delay_s=0.02)


def test_in_flight_request_finishes_during_drain(client: TestClient, engine: FakeEngine) -> None:
    lifecycle = lifecycle_of(client)
    results: dict[str, Any] = {}

    def slow_request() -> None:
        results["response"] = client.post(
            "/v1/completions", json=completion_body(max_tokens=25, stream=True)
        )

    worker = threading.Thread(target=slow_request)
    worker.start()
    deadline = time.monotonic() + 2
    while lifecycle.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lifecycle.in_flight == 1

    drained = portal(client).start_task_soon(lifecycle.drain, 5.0)
    refused = client.post("/v1/completions", json=completion_body())
    assert_error(refused, 503, type_="server_error", code="draining")
    assert not drained.done()  # still waiting for the streaming request

    worker.join(timeout=5)
    assert drained.result(timeout=5) is True
    response = results["response"]
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"length"' in response.text
    assert len(engine.requests) == 1
    assert engine.aborted == []


def test_a_drain_that_runs_out_of_time_cuts_requests_off_cleanly(
    client: TestClient, engine: FakeEngine
) -> None:
    # Past the drain's time the requests still running answer (a 503 `draining`, or its
    # error event in a stream), are aborted and settled, before the server stops.
    lifecycle = lifecycle_of(client)
    results: dict[str, Any] = {}

    def slow(name: str, stream: bool) -> None:
        body = completion_body(max_tokens=60, stream=stream)  # 1.2 s of tokens
        results[name] = client.post("/v1/completions", json=body)

    workers = [
        threading.Thread(target=slow, args=("plain", False)),
        threading.Thread(target=slow, args=("stream", True)),
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 2
    while lifecycle.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lifecycle.in_flight == 2

    started = time.monotonic()
    assert portal(client).call(lifecycle.drain, 0.2) is False
    assert time.monotonic() - started < 1.0  # cut off, not waited for
    for worker in workers:
        worker.join(timeout=5)
    assert_error(results["plain"], 503, type_="server_error", code="draining")
    assert results["plain"].headers["retry-after"] == "5"
    stream = results["stream"]
    assert stream.status_code == 200
    assert '"code":"draining"' in stream.text
    assert stream.text.endswith("data: [DONE]\n\n")
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)
    assert_settled(client, engine)
