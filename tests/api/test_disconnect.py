"""A client that goes away: the engine request is aborted (also while it is still queued),
the reservation settles, the slot is released, and the request is counted as 499."""

from __future__ import annotations

import concurrent.futures
import functools
import time
from typing import Any

from tests.api.conftest import (
    app_client,
    asgi_scope,
    assert_settled,
    chat_body,
    completion_body,
    disconnect_during,
    make_settings,
)
from tests.api.test_metrics import sample
from tests.fake_engine import MODEL_ID, FakeEngine


def test_a_stream_client_that_leaves_aborts_the_engine_request() -> None:
    engine = FakeEngine(token_delay_s=0.02)
    with app_client(engine, make_settings()) as client:
        sent = client.portal.call(
            disconnect_during,
            client,
            "/v1/chat/completions",
            chat_body(stream=True, max_tokens=200),
        )
        assert sent[0]["status"] == 200
        (request,) = engine.requests
        assert request.request_id in engine.aborted
        assert_settled(client, engine)
        labels = {"model": MODEL_ID, "endpoint": "/v1/chat/completions", "status": "499"}
        assert sample(client, "sluice_requests_total", **labels) == 1


def test_a_queued_request_is_aborted_when_its_client_leaves() -> None:
    engine = FakeEngine(token_delay_s=0.02, max_running=1)
    with (
        app_client(engine, make_settings()) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(client.post, "/v1/completions", json=completion_body(max_tokens=30))
        while not engine.core.running:
            time.sleep(0.005)
        sent = client.portal.call(
            functools.partial(
                disconnect_during,
                client,
                "/v1/completions",
                completion_body(max_tokens=5, prompt="queued"),
                after_chunks=None,
                engine=engine,
            )
        )
        assert sent[0]["status"] == 499
        queued = engine.requests[1]
        assert queued.request_id in engine.aborted
        assert running.result(timeout=10).status_code == 200
        assert_settled(client, engine)


def test_a_client_that_leaves_while_uploading_its_body_is_counted_as_499() -> None:
    engine = FakeEngine()
    with app_client(engine, make_settings()) as client:
        messages = [
            {"type": "http.request", "body": b'{"model": "', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = asgi_scope("/v1/completions", 500)
        client.portal.call(client.app, scope, receive, send)
        assert sent == []  # nobody to answer
        assert engine.requests == []
        # no body read: no model, no key
        labels = {"model": "none", "endpoint": "/v1/completions", "key": "none"}
        assert sample(client, "sluice_requests_total", **labels, status="499") == 1
        assert sample(client, "sluice_requests_total", **labels, status="500") is None
