"""Connections as a hostile or flaky network makes them, on a real `sluice serve` process
(synthetic engine, one sequence at a time, 20 tokens/s): half-open connections, too many
connections, a body that never ends, an upload cut short, and a stream that waits in the
engine's queue behind another."""

from __future__ import annotations

import concurrent.futures
import json
import select
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.e2e.server import SluiceProcess

HEADERS_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 300
MODEL = "synthetic"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = SluiceProcess(
        tmp_path_factory.mktemp("connections") / "server.log",
        "--engine",
        "synthetic",
        "--synthetic-tokens-per-s",
        "20",
        "--max-num-seqs",
        "1",
        "--sse-keep-alive-interval",
        "1",
        env={
            "SLUICE_LIMITS__HEADERS_TIMEOUT_S": str(HEADERS_TIMEOUT_S),
            "SLUICE_LIMITS__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "SLUICE_LIMITS__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _connect(server: SluiceProcess, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def _closed_by_server(sock: socket.socket, within_s: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `within_s`, and what it sent before."""
    received = b""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def _count(server: SluiceProcess, status: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sluice_requests_total{")
        and f'status="{status}"' in line
        and 'endpoint="/v1/completions"' in line
    )


def test_half_open_connections_are_closed_after_the_headers_timeout(
    server: SluiceProcess,
) -> None:
    silent = [_connect(server) for _ in range(50)]  # never send a byte
    partial = [  # a slowloris: headers that never end
        _connect(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(200)
    ]
    try:
        started = time.monotonic()
        outcomes = [_closed_by_server(s, HEADERS_TIMEOUT_S + 5) for s in silent + partial]
        assert all(closed for closed, _ in outcomes)
        assert time.monotonic() - started < HEADERS_TIMEOUT_S + 5
        assert all(sent.startswith(b"HTTP/1.1 408 ") for _, sent in outcomes)
    finally:
        for sock in silent + partial:
            sock.close()
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200


def test_a_request_pipelined_behind_a_long_stream_is_timed_from_its_turn(
    server: SluiceProcess,
) -> None:
    """Half a request pipelined behind a stream that runs past the deadlines: the stream
    finishes whole (no deadline while it is sent), then the half request gets its 408."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True})
    stream = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    half = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    sock = _connect(server, stream + half)  # 50 tokens at 20/s: 2.5 s, past both deadlines
    try:
        received = b""
        closed = False
        started = time.monotonic()
        while not closed and time.monotonic() - started < 30:
            closed, chunk = _closed_by_server(sock, 5)
            received += chunk
    finally:
        sock.close()
    assert b"data: [DONE]" in received, received[-300:]  # the stream was not cut
    assert closed  # and the half request was not kept forever
    assert received.rstrip().endswith(b'"code": "request_timeout"}}')
    assert time.monotonic() - started < 2.5 + HEADERS_TIMEOUT_S + 5


def test_connections_past_the_cap_get_503_and_are_closed(server: SluiceProcess) -> None:
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        extra = _connect(server)
        try:
            closed, sent = _closed_by_server(extra, 5)
        finally:
            extra.close()
        assert closed
        assert sent.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in sent
        assert b'"code": "too_many_connections"' in sent
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200


def test_a_body_that_never_ends_is_cut_off_and_counted_as_a_client_disconnect(
    server: SluiceProcess,
) -> None:
    before_499, before_500 = _count(server, "499"), _count(server, "500")
    sock = _connect(
        server,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"model": "synthetic", ',
    )
    try:
        closed, _ = _closed_by_server(sock, BODY_TIMEOUT_S + 5)
    finally:
        sock.close()
    assert closed
    _wait_for(lambda: _count(server, "499") == before_499 + 1)
    assert _count(server, "500") == before_500


def test_a_client_that_leaves_while_uploading_is_counted_as_499(server: SluiceProcess) -> None:
    before_499, before_500 = _count(server, "499"), _count(server, "500")
    sock = _connect(
        server,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"model": "synthetic", "prompt": "hel',
    )
    time.sleep(0.2)
    sock.close()
    _wait_for(lambda: _count(server, "499") == before_499 + 1)
    assert _count(server, "500") == before_500
    assert '"status": 499' in server.log() or '"status":499' in server.log()


def test_a_queued_stream_sends_pings_until_its_first_token(server: SluiceProcess) -> None:
    """One sequence at a time: the stream waits ~2 s in the engine's queue behind another
    request, sending `: ping` comments at once; the SDK ignores them."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 40}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{server.api}/completions", json=body, timeout=60)
        _wait_for(lambda: server.engine_stats()["running"] == 1)
        lines: list[tuple[float, str]] = []
        started = time.monotonic()
        with httpx.stream(
            "POST",
            f"{server.api}/completions",
            json={**body, "max_tokens": 3, "stream": True},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    lines.append((time.monotonic() - started, line))
        assert busy.result().status_code == 200
    first_data = next(i for i, (_, line) in enumerate(lines) if line.startswith("data: "))
    pings = [at for at, line in lines[:first_data] if line == ": ping"]
    assert len(pings) >= 1, lines
    assert pings[0] < 1.9  # sent while the first request still ran
    assert lines[-1][1] == "data: [DONE]"
    sdk = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{server.api}/completions", json=body, timeout=60)
        _wait_for(lambda: server.engine_stats()["running"] == 1)
        chunks = list(sdk.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True))
        assert busy.result().status_code == 200
    assert len(chunks) == 3
    assert all(chunk.choices[0].text for chunk in chunks)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
