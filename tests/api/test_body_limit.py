"""Request bodies over limits.max_body_bytes (4096 here): 413, declared length or not."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, assert_settled, completion_body
from tests.fake_engine import FakeEngine

LIMIT = 4096


def body_of_size(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (padded with the `user` field,
    which is not tokenised)."""
    empty = json.dumps(completion_body(user="", max_tokens=1)).encode()
    raw = json.dumps(completion_body(user="x" * (size - len(empty)), max_tokens=1)).encode()
    assert len(raw) == size
    return raw


def chunked(data: bytes, piece: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def test_body_at_the_limit_is_served(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions", content=body_of_size(LIMIT), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert_settled(client, engine)


def test_body_over_the_limit_with_content_length(client: TestClient, engine: FakeEngine) -> None:
    request = client.build_request(
        "POST",
        "/v1/completions",
        content=body_of_size(LIMIT + 1),
        headers={"content-type": "application/json", "x-request-id": "big-1"},
    )
    assert request.headers["content-length"] == str(LIMIT + 1)
    response = client.send(request)
    error = assert_error(response, 413, code="request_too_large")
    assert "4096 bytes" in error["message"]
    assert response.headers["x-request-id"] == "big-1"
    assert engine.requests == []


def test_body_over_the_limit_without_content_length(client: TestClient, engine: FakeEngine) -> None:
    request = client.build_request(
        "POST",
        "/v1/completions",
        content=chunked(body_of_size(LIMIT + 500)),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = client.send(request)
    assert_error(response, 413, code="request_too_large")
    assert engine.requests == []


def test_chunked_body_under_the_limit_is_served(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions",
        content=chunked(body_of_size(LIMIT - 100)),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert len(engine.requests) == 1


def test_limit_applies_to_chat_too(client: TestClient, engine: FakeEngine) -> None:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "x" * LIMIT}],
    }
    assert_error(client.post("/v1/chat/completions", json=body), 413, code="request_too_large")
    assert engine.requests == []


def test_get_requests_are_not_limited(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
