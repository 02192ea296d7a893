"""Whole-process behaviour on a server of its own: the per-request time limit, the SIGTERM
drain, and what happens when the engine dies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e import prestart
from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess

COUNT = {"model": MODEL, "prompt": "Count from 1 to 1000: 1, 2, 3,", "temperature": 0}


@pytest.fixture
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = prestart.take("limited_server", tmp_path_factory)  # a 12 s limit, 60 s drain
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _events(response: httpx.Response) -> Iterator[str]:
    return (line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: "))


@contextlib.contextmanager
def _stream_started(server: SluiceProcess, max_tokens: int) -> Iterator[tuple[str, Iterator[str]]]:
    """A streaming completion whose first event has arrived: (first event, the rest)."""
    with httpx.stream(
        "POST",
        f"{server.api}/completions",
        json={**COUNT, "max_tokens": max_tokens, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = _events(response)
        yield next(events), events


def test_time_limit_then_sigterm_drain(limited_server: SluiceProcess) -> None:
    server = limited_server
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]

    # Time limit, non-streaming: 1000 tokens take far longer than 12 s on this CPU (and the
    # drain's 40 tokens below far less, also on a slow, busy machine).
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**COUNT, max_tokens=1000)
    assert caught.value.status_code == 504
    assert caught.value.code == "request_timeout"

    # Time limit, streaming: the error arrives inside the stream, which still ends with [DONE].
    with httpx.stream(
        "POST",
        f"{server.api}/completions",
        json={**COUNT, "max_tokens": 1000, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = list(_events(response))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout"
    assert json.loads(events[0])["choices"][0]["text"]
    stats = server.wait_idle()
    assert (stats["running"], stats["waiting"], stats["in_flight"]) == (0, 0, 0)

    # Drain: SIGTERM while a stream is in flight.
    with _stream_started(server, max_tokens=40) as (first, rest):
        server.terminate()
        time.sleep(0.5)
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as refused:
            client.completions.create(**COUNT, max_tokens=5)
        assert refused.value.status_code == 503
        assert refused.value.code == "draining"
        assert refused.value.response.headers["retry-after"]
        received = [first, *rest]
    assert received[-1] == "[DONE]"
    chunks = [json.loads(event) for event in received[:-1]]
    assert "error" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.wait_exit() == 0
    # a clean stop leaves no traceback (vLLM's AsyncLLM.__del__ used to fail at exit) and no
    # report of native objects alive at the interpreter's teardown (triton's nanobind
    # bindings, which vLLM imports, printed dozens of "leaked" lines on every stop)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "leaked" not in log
    # the log ends with sluice's own last line, not with a library's clean-up noise
    assert "Finished server process" in log.strip().splitlines()[-1]


@pytest.fixture
def doomed_server(own_server_log: Path) -> Iterator[SluiceProcess]:
    process = SluiceProcess(own_server_log)
    try:
        yield process
    finally:
        process.stop()


def _answers_while_loading(server: SluiceProcess) -> None:
    """Before the model is loaded: alive, not ready, generation refused with Retry-After."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{server.url}/healthz", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    assert health.status_code == 200
    ready = httpx.get(f"{server.url}/readyz", timeout=2)
    assert ready.status_code == 503
    assert ready.json()["status"] == "loading"
    refused = httpx.post(f"{server.api}/completions", json={**COUNT, "max_tokens": 2}, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_loading"
    assert refused.headers["retry-after"]


def _engine_core_pid(server_pid: int) -> int:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child.pid
    raise AssertionError("no EngineCore child process found")


def test_loading_then_engine_death_fails_requests_and_exits_non_zero(
    doomed_server: SluiceProcess,
) -> None:
    server = doomed_server
    _answers_while_loading(server)
    server.wait_ready()
    core = _engine_core_pid(server.pid)
    health: list[int] = []

    def watch_health() -> None:
        # Record /healthz until the process stops answering.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health.append(httpx.get(f"{server.url}/healthz", timeout=2).status_code)
            except httpx.HTTPError:
                return
            time.sleep(0.05)

    with _stream_started(server, max_tokens=500) as (_first, rest):
        assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        os.kill(core, signal.SIGKILL)
        events = list(rest)
    watcher.join()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_dead"
    assert 503 in health
    assert server.wait_exit() != 0


def test_sigterm_while_the_model_loads_ends_the_process_and_its_engine(
    doomed_server: SluiceProcess,
) -> None:
    """Told to stop mid-load (the engine core process is up and loading), the process ends
    within the drain timeout (30 s by default) and leaves no engine process behind."""
    server = doomed_server
    _answers_while_loading(server)
    deadline = time.monotonic() + 60
    core: psutil.Process | None = None
    while core is None and time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, psutil.Error):
            core = psutil.Process(_engine_core_pid(server.pid))
        time.sleep(0.1)
    assert core is not None, "the engine core never started"
    assert httpx.get(f"{server.url}/readyz", timeout=5).json()["status"] == "loading"
    stopped = time.monotonic()
    server.terminate()
    assert server.wait_exit(timeout_s=30) == 0
    assert time.monotonic() - stopped < 30
    core.wait(10)  # gone (or reaped) rather than loading on as an orphan
    assert not core.is_running()
