"""x-request-id: echoed when the client sends one, generated otherwise, on every response."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.api.conftest import completion_body


def test_incoming_id_is_echoed(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json=completion_body(), headers={"x-request-id": "abc-123"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"


def test_id_is_generated_when_absent(client: TestClient) -> None:
    first = client.post("/v1/completions", json=completion_body()).headers["x-request-id"]
    second = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert re.fullmatch(r"[0-9a-f]{32}", second)
    assert first != second


def test_id_on_streams_and_errors(client: TestClient) -> None:
    headers = {"x-request-id": "req-7"}
    stream = client.post("/v1/completions", json=completion_body(stream=True), headers=headers)
    invalid = client.post("/v1/completions", json={"model": "fake-model"}, headers=headers)
    missing = client.get("/nope", headers=headers)
    assert [r.status_code for r in (stream, invalid, missing)] == [200, 400, 404]
    assert [r.headers["x-request-id"] for r in (stream, invalid, missing)] == ["req-7"] * 3


def test_long_id_is_truncated(client: TestClient) -> None:
    response = client.get("/healthz", headers={"x-request-id": "x" * 500})
    assert response.headers["x-request-id"] == "x" * 128


def test_only_one_id_header(client: TestClient) -> None:
    response = client.get("/healthz", headers={"x-request-id": "once"})
    assert response.headers.get_list("x-request-id") == ["once"]
