"""The gateway across real processes: two `sluice serve` sharing one real Redis.

`real` runs the real vLLM engine on the default model and fails open; `synth` runs the
synthetic engine under the same model id and fails closed. Keys are created through the
admin API of one and used on both: one limit and one budget hold across the pair, spend
survives restarts (Redis and SQLite), and stopping Redis mid-run shows both failure modes.
The official `openai` SDK checks the 401/403/429 bodies and headers.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess
from tests.redis_server import RedisServer, redis_available

ADMIN = "e2e-admin-key"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/test.sh installs it as root)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def gateway_env(redis: RedisServer) -> dict[str, str]:
    return {
        "SLUICE_GATEWAY__STORE": "redis",
        "SLUICE_GATEWAY__REDIS_URL": redis.url,
        "SLUICE_GATEWAY__ADMIN_KEY": ADMIN,
        "SLUICE_GATEWAY__KEY_CACHE_S": "0",
    }


def synthetic(log: Path, redis: RedisServer, *args: str) -> SluiceProcess:
    return SluiceProcess(
        log,
        "--engine",
        "synthetic",
        "--served-model-name",
        MODEL,
        "--synthetic-tokens-per-s",
        "500",
        *args,
        env=gateway_env(redis),
    )


@pytest.fixture(scope="module")
def pair(
    redis_store: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SluiceProcess, SluiceProcess]]:
    logs = tmp_path_factory.mktemp("gateway")
    real = SluiceProcess(
        logs / "real.log",
        "--max-num-seqs",
        "4",
        "--max-model-len",
        "2048",
        "--redis-failure",
        "open",
        env=gateway_env(redis_store),
    )
    synth = synthetic(logs / "synth.log", redis_store, "--redis-failure", "closed")
    try:
        synth.wait_ready()
        real.wait_ready()
        yield real, synth
    finally:
        synth.stop()
        real.stop()


def create_key(server: SluiceProcess, **policy: Any) -> str:
    response = httpx.post(f"{server.url}/admin/keys", json=policy, headers=ADMIN_AUTH, timeout=10)
    assert response.status_code == 201, response.text
    secret: str = response.json()["secret"]
    return secret


def usage(server: SluiceProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/admin/keys/{name}/usage", headers=ADMIN_AUTH, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def chat(server: SluiceProcess, secret: str, max_tokens: int = 1) -> httpx.Response:
    return httpx.post(
        f"{server.api}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        headers={"Authorization": f"Bearer {secret}"},
        timeout=120,
    )


def burst(servers: list[SluiceProcess], secret: str, count: int, max_tokens: int) -> list[Any]:
    """`count` requests at once, spread over `servers`; the responses."""
    start = threading.Barrier(count)

    def one(i: int) -> httpx.Response:
        start.wait()
        return chat(servers[i % len(servers)], secret, max_tokens)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_sdk_sees_openai_error_types(pair: tuple[SluiceProcess, SluiceProcess]) -> None:
    real, _ = pair
    good = create_key(real, name="sdk-one", rpm=1)
    blocked = create_key(real, name="sdk-blocked", models=["another-model"])
    question = [{"role": "user", "content": "What is the capital of France?"}]

    def client(secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=real.api, api_key=secret, max_retries=0, timeout=120)

    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        client("sk-sluice-wrong").chat.completions.create(model=MODEL, messages=question)  # type: ignore[arg-type]
    assert unauthenticated.value.status_code == 401
    assert unauthenticated.value.code == "invalid_api_key"

    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(blocked).chat.completions.create(model=MODEL, messages=question)  # type: ignore[arg-type]
    assert denied.value.code == "model_not_allowed"

    raw = client(good).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=question,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Paris" in (raw.parse().choices[0].message.content or "")

    with pytest.raises(openai.RateLimitError) as limited:
        client(good).chat.completions.create(model=MODEL, messages=question)  # type: ignore[arg-type]
    assert limited.value.code == "rate_limit_exceeded"
    headers = limited.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"

    broke = create_key(real, name="sdk-broke", budget_tokens=10)
    with pytest.raises(openai.RateLimitError) as quota:
        client(broke).chat.completions.create(model=MODEL, messages=question, max_tokens=50)  # type: ignore[arg-type]
    assert quota.value.code == "insufficient_quota"


def test_two_processes_enforce_one_request_limit(
    pair: tuple[SluiceProcess, SluiceProcess],
) -> None:
    real, synth = pair
    secret = create_key(real, name="shared-rpm", rpm=12)
    responses = burst([synth, real], secret, 40, max_tokens=1)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 12, statuses
    assert statuses.count(429) == 28
    assert all(
        r.json()["error"]["code"] == "rate_limit_exceeded"
        for r in responses
        if r.status_code == 429
    )
    for server in pair:
        assert server.wait_idle()["in_flight"] == 0


def test_two_processes_share_one_budget(pair: tuple[SluiceProcess, SluiceProcess]) -> None:
    real, synth = pair
    budget = 400
    secret = create_key(synth, name="shared-budget", budget_tokens=budget)
    served = 0
    refused = 0
    for _ in range(6):
        for response in burst([synth, real], secret, 8, max_tokens=8):
            if response.status_code == 200:
                served += response.json()["usage"]["total_tokens"]
            else:
                assert response.status_code == 429, response.text
                assert response.json()["error"]["code"] == "insufficient_quota"
                refused += 1
    spent = usage(real, "shared-budget")
    assert spent["windows"]["month"]["tokens"] == served  # settled to the real counts
    assert served <= budget
    assert refused > 0
    assert spent["reserved"]["tokens"] == 0


def test_spend_survives_restarts_of_sluice_and_redis(
    pair: tuple[SluiceProcess, SluiceProcess], redis_store: RedisServer, tmp_path: Path
) -> None:
    real, _ = pair
    secret = create_key(real, name="durable", budget_tokens=100_000)
    for _ in range(3):
        assert chat(real, secret, max_tokens=4).status_code == 200
    before = usage(real, "durable")["windows"]["month"]["tokens"]
    assert before > 0
    redis_store.stop()
    redis_store.start()
    fresh = synthetic(tmp_path / "fresh.log", redis_store)
    try:
        fresh.wait_ready()
        assert usage(fresh, "durable")["windows"]["month"]["tokens"] == before
    finally:
        fresh.stop()


def test_embedded_spend_survives_a_restart(tmp_path: Path, redis_store: RedisServer) -> None:
    env = {
        "SLUICE_GATEWAY__ADMIN_KEY": ADMIN,
        "SLUICE_GATEWAY__DATABASE": str(tmp_path / "sluice.db"),
    }
    args = ("--engine", "synthetic", "--served-model-name", MODEL)
    first = SluiceProcess(tmp_path / "first.log", *args, env=env)
    try:
        first.wait_ready()
        secret = create_key(first, name="local", budget_tokens=50_000)
        for _ in range(3):
            assert chat(first, secret, max_tokens=5).status_code == 200
        before = usage(first, "local")["windows"]["day"]["tokens"]
    finally:
        first.stop()
    second = SluiceProcess(tmp_path / "second.log", *args, env=env)
    try:
        second.wait_ready()
        assert usage(second, "local")["windows"]["day"]["tokens"] == before > 0
        assert chat(second, secret).status_code == 200  # the key survived too
    finally:
        second.stop()


def _store_failures(server: SluiceProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sluice_store_failures_total{")
    )


def test_redis_stopped_mid_run_fails_open_or_closed_then_recovers(
    pair: tuple[SluiceProcess, SluiceProcess], redis_store: RedisServer
) -> None:
    real, synth = pair
    secret = create_key(real, name="outage", rpm=1000)
    served = 0  # tokens of every 200, wherever it was served

    def spend(response: httpx.Response) -> httpx.Response:
        nonlocal served
        if response.status_code == 200:
            served += response.json()["usage"]["total_tokens"]
        return response

    assert spend(chat(real, secret)).status_code == 200  # both learn the key while Redis is up
    assert spend(chat(synth, secret)).status_code == 200
    redis_store.stop()
    try:
        started = time.monotonic()
        open_response = spend(chat(real, secret))
        closed_response = spend(chat(synth, secret))
        assert time.monotonic() - started < 60  # bounded, no hang (real generation included)
        assert open_response.status_code == 200, open_response.text
        assert closed_response.status_code == 503
        assert closed_response.json()["error"]["code"] == "store_unavailable"
        assert closed_response.headers["retry-after"] == "5"
        sdk = openai.OpenAI(base_url=synth.api, api_key=secret, max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as unavailable:
            sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=1,
            )
        assert unavailable.value.status_code == 503
        assert unavailable.value.code == "store_unavailable"
        assert _store_failures(real) >= 1 and _store_failures(synth) >= 1
        assert "failing open" in real.log() and "failing closed" in synth.log()
    finally:
        redis_store.start()
    for server in (real, synth):  # reconnects by itself
        assert spend(chat(server, secret)).status_code == 200
        assert server.proc.poll() is None
    # What the fail-open replica served during the outage reached Redis; nothing is held.
    spent = usage(synth, "outage")
    assert spent["windows"]["month"]["tokens"] == served
    assert spent["reserved"]["tokens"] == 0


def test_running_keys_across_the_pair(pair: tuple[SluiceProcess, SluiceProcess]) -> None:
    """One process changes a key, the other enforces the change at once (key_cache_s 0): the
    concurrency cap counts both processes' requests, a rotation keeps the old secret for its
    grace, an update applies in place."""
    real, synth = pair
    old = create_key(synth, name="ops", max_concurrent=1)
    long_stream = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1500,  # 3 s at the synthetic engine's 500 tokens/s
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{synth.api}/chat/completions",
        json=long_stream,
        headers={"Authorization": f"Bearer {old}"},
        timeout=60,
    ) as running:
        assert running.status_code == 200
        refused = chat(real, old)  # the other process sees the request in flight
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        for _ in running.iter_bytes():
            pass
    assert chat(real, old).status_code == 200
    rotated = httpx.post(
        f"{real.url}/admin/keys/ops/rotate", json={"grace_s": 120}, headers=ADMIN_AUTH, timeout=10
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    for server in (real, synth):
        for secret in (old, new):
            assert chat(server, secret).status_code == 200
    patched = httpx.patch(
        f"{synth.url}/admin/keys/ops", json={"enabled": False}, headers=ADMIN_AUTH, timeout=10
    )
    assert patched.status_code == 200, patched.text
    for secret in (old, new):
        denied = chat(real, secret)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "key_disabled"
    assert usage(real, "ops")["reserved"]["tokens"] == 0
