"""While the model loads: alive, not ready, generation refused with 503 model_loading."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sluice.config import Settings
from sluice.engine.models import default_model_dir
from sluice.lifecycle import Phase
from tests.api.conftest import (
    app_client,
    assert_error,
    chat_body,
    completion_body,
    lifecycle_of,
    make_settings,
    wait_ready,
)
from tests.fake_engine import MODEL_FOLDER, FakeEngine


def test_before_ready(settings: Settings) -> None:
    engine = FakeEngine(start_delay_s=30)  # never finishes loading during this test
    with app_client(engine, settings, wait=False) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["retry-after"] == "10"
        assert ready.json() == {
            "status": "loading",
            "step": "loading model",
            "in_flight": 0,
            "model_load_seconds": None,
        }

        for path, body in [
            ("/v1/completions", completion_body()),
            ("/v1/chat/completions", chat_body(stream=True)),
        ]:
            response = client.post(path, json=body)
            assert_error(response, 503, type_="server_error", code="model_loading")
            assert response.headers["retry-after"] == "10"
        models = client.get("/v1/models")
        assert_error(models, 503, type_="server_error", code="model_loading")
        assert models.headers["retry-after"] == "10"

        assert engine.requests == []
        assert lifecycle_of(client).in_flight == 0
        assert lifecycle_of(client).phase is Phase.LOADING


def test_the_port_is_open_while_the_default_model_is_pulled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """First start: the default model is not cached. `/readyz` says so while it is pulled,
    then the engine loads on it."""
    pulled = threading.Event()
    calls: list[Path] = []

    def pull(cache_dir: Path, progress: object = None) -> Path:
        calls.append(cache_dir)
        pulled.wait(10)
        return default_model_dir(cache_dir)

    monkeypatch.setattr("sluice.app.is_provisioned", lambda folder: bool(calls) and pulled.is_set())
    monkeypatch.setattr("sluice.app.ensure_default_model", pull)
    cache_dir = MODEL_FOLDER.parent.parent  # the engine serves this cache's default model
    with app_client(FakeEngine(), make_settings(cache_dir=cache_dir), wait=False) as client:
        for _ in range(100):
            if calls:
                break
            time.sleep(0.01)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["step"] == "pulling model"
        assert_error(
            client.post("/v1/completions", json=completion_body()),
            503,
            type_="server_error",
            code="model_loading",
        )
        pulled.set()
        wait_ready(client)
        assert calls == [cache_dir]
        assert "step" not in client.get("/readyz").json()


def test_becomes_ready(settings: Settings) -> None:
    engine = FakeEngine(start_delay_s=0.1)
    with app_client(engine, settings, wait=False) as client:
        assert client.get("/readyz").status_code == 503
        wait_ready(client)
        body = client.get("/readyz").json()
        assert body["status"] == "ready"
        assert body["model_load_seconds"] >= 0.1
        assert client.post("/v1/completions", json=completion_body()).status_code == 200


def test_engine_that_cannot_start(settings: Settings) -> None:
    engine = FakeEngine(start_error=RuntimeError("no GPU found"))
    with app_client(engine, settings, wait=False) as client:
        lifecycle = lifecycle_of(client)
        for _ in range(100):
            if lifecycle.phase is Phase.DEAD:
                break
            client.get("/healthz")
        assert lifecycle.exit_code == 1
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "dead", "reason": "engine start-up failed: no GPU found"}
        assert client.get("/readyz").status_code == 503
        assert_error(
            client.post("/v1/completions", json=completion_body()),
            503,
            type_="server_error",
            code="engine_dead",
        )
        assert engine.requests == []


def test_healthy_app_probes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert "retry-after" not in ready.headers
    body = ready.json()
    assert body["status"] == "ready"
    assert body["in_flight"] == 0
    assert isinstance(body["model_load_seconds"], float)
    assert body["engine"] == {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}


def test_models(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    (model,) = listing["data"]
    assert {k: model[k] for k in ("id", "object", "owned_by", "max_model_len")} == {
        "id": "fake-model",
        "object": "model",
        "owned_by": "vllm",
        "max_model_len": 512,
    }
    assert isinstance(model["created"], int)
    retrieved = client.get("/v1/models/fake-model").json()
    assert retrieved["id"] == model["id"]
    assert retrieved["max_model_len"] == model["max_model_len"]
