"""API tier: the real ASGI app with a fake engine (vLLM's real front end over a scripted core,
tests/fake_engine.py), through Starlette's TestClient."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import sluice
from sluice.app import create_app
from sluice.config import Settings
from sluice.gateway.service import Gateway
from sluice.lifecycle import Lifecycle
from tests.api.openai_schema import assert_matches
from tests.fake_engine import MODEL_ID, FakeEngine, ScriptedCore

API_LIMITS = {"max_tokens_cap": 64, "max_n": 4, "max_body_bytes": 4096}


def make_settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _no_sluice_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read SLUICE_* variables; the developer's shell must not change these tests.
    The embedded store's database goes to a fresh folder per test."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def engine_slow_keep_alive() -> FakeEngine:
    """A fake engine making a token every 1.5 s, with vLLM's 1 s SSE keep-alive."""
    return FakeEngine(
        ScriptedCore(tokens_per_s=1 / 1.5),
        cli_args=("--max-model-len", "512", "--sse-keep-alive-interval", "1"),
    )


@pytest.fixture(scope="module")
def module_engine() -> FakeEngine:
    """One fake engine for a whole module (for modules whose tests leave no state behind)."""
    return FakeEngine()


@pytest.fixture(scope="module")
def module_client(
    module_engine: FakeEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """One app for a whole module, on `module_engine`, with the API limits."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("SLUICE_"):
                patch.delenv(name)
        patch.setenv("SLUICE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        with app_client(module_engine, make_settings(limits=dict(API_LIMITS))) as test_client:
            yield test_client


TOOL_TEMPLATE = Path(sluice.__file__).parent / "engine/templates/smollm2_tools.jinja"


@pytest.fixture
def engine_with_tools() -> FakeEngine:
    """A fake engine with vLLM's hermes tool parser and a chat template that lists tools."""
    return FakeEngine(
        cli_args=(
            "--max-model-len",
            "512",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--chat-template",
            str(TOOL_TEMPLATE),
        )
    )


@pytest.fixture
def settings() -> Settings:
    return make_settings(limits=dict(API_LIMITS))


@pytest.fixture
def client(engine: FakeEngine, settings: Settings) -> Iterator[TestClient]:
    with app_client(engine, settings) as test_client:
        yield test_client
        # Whatever a test did, nothing may stay counted in flight or running in the engine.
        assert_settled(test_client, engine)


@contextlib.contextmanager
def app_client(
    engine: FakeEngine, settings: Settings, *, wait: bool = True
) -> Iterator[TestClient]:
    """A TestClient on a fresh app (lifespan running); `wait=False` skips waiting for ready."""
    app = create_app(settings, engine=engine)
    with TestClient(app) as test_client:
        if wait:
            wait_ready(test_client)
        yield test_client


READY_TIMEOUT_S = 60.0  # a cold first start imports and compiles vLLM's front end


def wait_ready(test_client: TestClient) -> None:
    """Wait for `/readyz` to say ready: at most `READY_TIMEOUT_S` (seconds warm, more on a
    fresh machine where the first app's start-up imports vLLM's serving layer from a cold
    disk), failing at once with the reason when the start-up failed."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = test_client.get("/readyz")
        if answer.status_code == 200:
            return
        if answer.json().get("status") == "dead":
            raise AssertionError(f"fake app failed to start: {answer.text}")
        time.sleep(0.01)
    raise AssertionError(f"fake app not ready within {READY_TIMEOUT_S:.0f} s: {answer.text}")


def lifecycle_of(test_client: TestClient) -> Lifecycle:
    lifecycle: Lifecycle = test_client.app.state.lifecycle  # type: ignore[attr-defined]
    return lifecycle


def assert_settled(test_client: TestClient, engine: FakeEngine) -> None:
    """No request counted in flight, no engine request left running or queued, in the
    engine core or in vLLM's front end, and the engine's own figures (the gauges) say so."""
    for _ in range(100):  # an abort reaches the core one event-loop turn after the response
        stats = engine.stats()
        if (
            not engine.core.active
            and engine.client.get_num_unfinished_requests() == 0
            and (stats.running, stats.waiting) == (0, 0)
        ):
            break
        time.sleep(0.01)
    assert lifecycle_of(test_client).in_flight == 0
    gateway: Gateway = test_client.app.state.gateway  # type: ignore[attr-defined]
    assert gateway.admission.queued_tokens == 0
    if engine.core.resources.engine_dead:
        return  # a dead core keeps what it held; nothing is sent to it any more
    assert engine.core.active == set()
    assert engine.client.get_num_unfinished_requests() == 0
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "prompt": "one two three", "max_tokens": 3, **fields}


def tokens(engine: FakeEngine, text: str) -> list[int]:
    """`text` in the model's tokens (no special tokens added)."""
    ids: list[int] = engine.core.tokenizer.encode(text, add_special_tokens=False)
    return ids


def chat_prompt(engine: FakeEngine, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids the model's own chat template makes of `messages`."""
    tokenizer = engine.core.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def chat_body(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 3,
        **fields,
    }


def assert_error(
    response: Any,
    status: int,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """`response` is OpenAI's error shape with exactly these fields; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_matches(body, "ErrorResponse")
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == type_
    assert error["param"] == param
    assert error["code"] == code
    return error


async def disconnect_during(
    test_client: TestClient,
    path: str,
    body: dict[str, Any],
    *,
    after_chunks: int | None = 1,
    engine: FakeEngine | None = None,
) -> list[dict[str, Any]]:
    """Send `body` to the app at the ASGI level and go away: after `after_chunks` body chunks
    of a stream, or (`after_chunks=None`) as soon as `engine` holds the request. Run it on the
    app's loop: `test_client.portal.call(disconnect_during, ...)`. Returns what was sent."""
    raw = json.dumps(body).encode()
    held = len(engine.core.requests) if engine is not None else 0
    pending = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict[str, Any]] = []
    leave = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        if after_chunks is None:
            assert engine is not None
            while len(engine.core.requests) <= held:  # noqa: ASYNC110 (the core has no event)
                await asyncio.sleep(0.005)
            leave.set()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if after_chunks is not None and len(chunks) >= after_chunks:
            leave.set()

    await test_client.app(asgi_scope(path, len(raw)), receive, send)  # type: ignore[arg-type]
    return sent


def asgi_scope(path: str, content_length: int) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to `path` declaring `content_length` bytes."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % content_length),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
