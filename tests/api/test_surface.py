"""The rest of vLLM's surface behind the gateway: /tokenize and /detokenize, /v1/responses,
model listing scoped to the key, LoRA adapters as model ids (static and through the admin
API), /health and /version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import (
    app_client,
    assert_error,
    assert_settled,
    chat_body,
    make_settings,
    tokens,
)
from tests.api.test_gateway import ADMIN, auth, gateway_settings
from tests.fake_engine import MODEL_ID, FakeEngine

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_tokenize_and_detokenize(client: TestClient, engine: FakeEngine) -> None:
    body = client.post("/tokenize", json={"model": MODEL_ID, "prompt": "one two three"}).json()
    assert body["tokens"] == tokens(engine, "one two three")
    assert body["count"] == 3
    assert body["max_model_len"] == 512
    text = client.post("/detokenize", json={"model": MODEL_ID, "tokens": body["tokens"]}).json()
    assert text["prompt"] == "one two three"
    chat = client.post(
        "/tokenize", json={"model": MODEL_ID, "messages": chat_body()["messages"]}
    ).json()
    assert chat["count"] > 3  # the chat template's own tokens
    assert engine.requests == []  # no engine work


@pytest.mark.parametrize("tokens", [[10**9], [1, 2, 10**9]])
def test_detokenize_refuses_ids_out_of_the_vocabulary(
    client: TestClient, tokens: list[int]
) -> None:
    # as a prompt of token ids is refused: there is no text for such an id
    response = client.post("/detokenize", json={"model": MODEL_ID, "tokens": tokens})
    error = assert_error(response, 400, param="tokens")
    assert "out of vocabulary" in error["message"]


def test_tokenize_refuses_unknown_models(client: TestClient) -> None:
    response = client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert_error(response, 404, param="model", code="model_not_found")


def test_responses_api(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/responses", json={"model": MODEL_ID, "input": "hello", "max_output_tokens": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "response"
    assert body["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == " one two three"
    assert body["usage"]["output_tokens"] == 3
    assert_settled(client, engine)


def test_responses_api_stream(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/responses",
        json={"model": MODEL_ID, "input": "hello", "max_output_tokens": 3, "stream": True},
    )
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "event: response.created"
    assert events[-1] == "event: response.completed"
    assert "event: response.output_text.delta" in events
    assert_settled(client, engine)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    settings = gateway_settings(
        tmp_path,
        {
            "plain": {},
            "tight": {"rpm": 1},
            "other-model": {"models": ["some-other-model"]},
            "lora-only": {"models": ["tiny"]},
        },
    )
    with app_client(engine, settings) as client:
        yield client, engine
        assert_settled(client, engine)


def test_models_are_listed_as_the_key_may_use_them(
    keyed: tuple[TestClient, FakeEngine],
) -> None:
    client, _ = keyed
    listed = client.get("/v1/models", headers=auth("plain")).json()["data"]
    assert [m["id"] for m in listed] == [MODEL_ID]
    assert client.get("/v1/models", headers=auth("other-model")).json()["data"] == []
    refused = client.get(f"/v1/models/{MODEL_ID}", headers=auth("other-model"))
    assert_error(refused, 404, param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body(stream=True)),
        ("/v1/responses", {"model": MODEL_ID, "input": "hi", "stream": True}),
    ],
)
def test_streams_refused_by_quota_are_refused_before_they_start(
    keyed: tuple[TestClient, FakeEngine], path: str, body: dict[str, object]
) -> None:
    client, engine = keyed
    assert client.post(path, json=body, headers=auth("tight")).status_code == 200
    second = client.post(path, json=body, headers=auth("tight"))
    assert_error(second, 429, type_="requests", code="rate_limit_exceeded")
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(engine.requests) == 1


@pytest.fixture
def lora_engine(tmp_path: Path) -> FakeEngine:
    adapter = tmp_path / "tiny-adapter"
    adapter.mkdir()
    return FakeEngine(
        cli_args=(
            "--max-model-len",
            "512",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            f"tiny={adapter}",
        )
    )


def test_lora_adapters_are_model_ids_under_the_keys_allowlist(
    lora_engine: FakeEngine, tmp_path: Path
) -> None:
    settings = gateway_settings(tmp_path, {"plain": {}, "lora-only": {"models": ["tiny", "late"]}})
    with app_client(lora_engine, settings) as client:
        listed = [m["id"] for m in client.get("/v1/models", headers=auth("plain")).json()["data"]]
        assert listed == [MODEL_ID, "tiny"]
        only = client.get("/v1/models", headers=auth("lora-only")).json()["data"]
        assert [m["id"] for m in only] == ["tiny"]
        assert only[0]["parent"] == MODEL_ID
        served = client.post(
            "/v1/chat/completions", json=chat_body(model="tiny"), headers=auth("lora-only")
        )
        assert served.status_code == 200, served.text
        assert served.json()["model"] == "tiny"
        assert lora_engine.requests[-1].lora_request.lora_name == "tiny"
        base = client.post("/v1/chat/completions", json=chat_body(), headers=auth("lora-only"))
        assert_error(base, 403, param="model", code="model_not_allowed")

        # load and unload at run time through the admin API
        late = tmp_path / "late-adapter"
        late.mkdir()
        assert_error(
            client.post("/admin/lora/load", json={"lora_name": "late", "lora_path": str(late)}),
            401,
            code="invalid_api_key",
        )
        loaded = client.post(
            "/admin/lora/load",
            json={"lora_name": "late", "lora_path": str(late)},
            headers=ADMIN_AUTH,
        )
        assert loaded.status_code == 200, loaded.text
        names = [a["name"] for a in client.get("/admin/lora", headers=ADMIN_AUTH).json()["data"]]
        assert names == ["tiny", "late"]
        used = client.post(
            "/v1/chat/completions", json=chat_body(model="late"), headers=auth("lora-only")
        )
        assert used.status_code == 200
        again = client.post(
            "/admin/lora/load",
            json={"lora_name": "late", "lora_path": str(late)},
            headers=ADMIN_AUTH,
        )
        assert_error(again, 409, param="lora_name", code="conflict")
        unknown = client.post(
            "/admin/lora/load",
            json={"lora_name": "x", "lora_path": str(late), "bogus": 1},
            headers=ADMIN_AUTH,
        )
        assert_error(unknown, 400, param="bogus")
        engine_client = client.app.state.serving.models.engine_client  # type: ignore[attr-defined]

        async def refuse(request: object) -> None:  # what vLLM raises for a rank over the cap
            raise ValueError("LoRA rank 16 is greater than max_lora_rank 8.")

        engine_client.add_lora, real = refuse, engine_client.add_lora
        try:
            big = client.post(
                "/admin/lora/load",
                json={"lora_name": "big", "lora_path": str(late)},
                headers=ADMIN_AUTH,
            )
        finally:
            engine_client.add_lora = real
        error = assert_error(big, 400, param="lora_path")  # the adapter's fault, not a 500
        assert "max_lora_rank" in error["message"]
        unloaded = client.post("/admin/lora/unload", json={"lora_name": "late"}, headers=ADMIN_AUTH)
        assert unloaded.status_code == 200
        gone = client.post(
            "/v1/chat/completions", json=chat_body(model="late"), headers=auth("lora-only")
        )
        assert_error(gone, 404, param="model", code="model_not_found")
        missing = client.post("/admin/lora/unload", json={"lora_name": "late"}, headers=ADMIN_AUTH)
        assert_error(missing, 404, code="not_found")
        assert_settled(client, lora_engine)


def test_health_and_version(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    version = client.get("/version").json()
    assert version["version"].startswith("0.32")
    assert "sluice_version" in version


def test_the_openapi_document_gives_each_generating_body_vllms_schema(
    client: TestClient,
) -> None:
    """The generating routes read their bodies themselves (an upstream model's body is
    forwarded as it came), yet the document still describes them with vLLM's models, so
    clients and schemathesis see the real fields."""
    document = client.get("/openapi.json").json()
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/responses", "ResponsesRequest"),
        ("/v1/embeddings", "EmbeddingCompletionRequest"),
    ):
        operations = document["paths"][path]
        assert list(operations) == ["post"]
        body = operations["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert model in json.dumps(body), (path, body)
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_cors_is_vllms_flags(tmp_path: Path) -> None:
    """`--allowed-origins` (vLLM's flag) lets a browser page call sluice: its preflight is
    answered without a key, and answers, errors included, carry the headers the page needs
    to read them. Without the flag (vLLM's default) no CORS header is sent."""
    page = "https://app.example"
    preflight_headers = {
        "Origin": page,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    engine = FakeEngine(cli_args=("--max-model-len", "512", "--allowed-origins", f'["{page}"]'))
    settings = gateway_settings(tmp_path, {"plain": {}})
    with app_client(engine, settings) as client:
        preflight = client.options("/v1/chat/completions", headers=preflight_headers)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == page
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": page})
        assert_error(refused, 401, code="invalid_api_key")
        assert refused.headers["access-control-allow-origin"] == page
        served = client.post(
            "/v1/chat/completions",
            json=chat_body(max_tokens=2, stream=True),
            headers={**auth("plain"), "Origin": page},
        )
        assert served.status_code == 200 and served.text.rstrip().endswith("data: [DONE]")
        assert served.headers["access-control-allow-origin"] == page
        other = client.get(
            "/v1/models", headers={**auth("plain"), "Origin": "https://evil.example"}
        )
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    with app_client(FakeEngine(), settings) as client:
        plain = client.get("/v1/models", headers={**auth("plain"), "Origin": page})
        assert "access-control-allow-origin" not in plain.headers


def test_a_model_name_that_is_not_ascii_is_served() -> None:
    """A served name (or LoRA name) outside Latin-1 is served; `x-sluice-model` carries it
    percent-encoded (helper audit: every request to such a name was a 500)."""
    engine = FakeEngine(cli_args=("--served-model-name", MODEL_ID, "модель"))
    with app_client(engine, make_settings()) as client:
        for stream in (False, True):
            body = chat_body(model="модель", max_tokens=2, stream=stream)
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert unquote(response.headers["x-sluice-model"]) == "модель"
        assert_settled(client, engine)


def test_models_with_a_trailing_slash_is_the_listing(client: TestClient) -> None:
    listed = client.get("/v1/models/")
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == [MODEL_ID]


def test_a_whole_response_uses_the_json_field_names(client: TestClient) -> None:
    """`text.format.schema`, not pydantic's `schema_` (vLLM's route dumps by alias)."""
    schema = {"type": "object", "properties": {}}
    body = {
        "model": MODEL_ID,
        "input": "hi",
        "max_output_tokens": 2,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}},
    }
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["text"]["format"]["schema"] == schema
    assert "schema_" not in response.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_is_refused_whatever_the_temperature(
    client: TestClient, engine: FakeEngine, path: str, n: int
) -> None:
    """vLLM refuses n < 1; greedy sampling must not route it past that check (it hung until
    the time limit: the fan-out made no sequence)."""
    body = chat_body() if path == "/v1/chat/completions" else {"model": MODEL_ID, "prompt": "hi"}
    for stream in (False, True):
        response = client.post(path, json={**body, "n": n, "temperature": 0, "stream": stream})
        assert_error(response, 400, param="n")
    assert engine.requests == []
