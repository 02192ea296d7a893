"""POST /v1/completions through vLLM's serving layer: shapes, prompts as text and token ids,
lists of prompts, n, echo, logprobs, usage."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.api.conftest import assert_settled, chat_body, completion_body, tokens
from tests.api.openai_schema import assert_matches
from tests.api.sse import sse_json
from tests.fake_engine import MODEL_ID, FakeEngine


def test_shape(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=3))
    assert response.status_code == 200
    body = response.json()
    assert_matches(body, "CreateCompletionResponse")
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL_ID
    (choice,) = body["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (
        0,
        " one two three",
        "length",
    )
    prompt = tokens(engine, "one two three")
    assert engine.core.requests[0].prompt_token_ids == prompt
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 3
    assert_settled(client, engine)


def test_default_max_tokens_is_openais_16(client: TestClient, engine: FakeEngine) -> None:
    body = completion_body()
    del body["max_tokens"]
    response = client.post("/v1/completions", json=body)
    assert response.json()["usage"]["completion_tokens"] == 16
    assert engine.core.requests[0].sampling_params.max_tokens == 16


def test_token_id_prompts(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(prompt=[0, 0, 0, 0, 0]))
    assert response.status_code == 200, response.text
    assert engine.core.requests[0].prompt_token_ids == [0, 0, 0, 0, 0]
    assert response.json()["usage"]["prompt_tokens"] == 5
    several = client.post("/v1/completions", json=completion_body(prompt=[[5, 6], [7]]))
    assert [c["index"] for c in several.json()["choices"]] == [0, 1]
    assert several.json()["usage"]["prompt_tokens"] == 3


def test_a_null_prompt_starts_a_new_document(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(prompt=None))
    assert response.status_code == 200, response.text
    tokenizer = engine.core.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 2
    assert engine.core.requests[0].prompt_token_ids == [start]


def test_a_list_of_prompts_with_n(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        "/v1/completions",
        json=completion_body(prompt=["a b", "c d e"], n=2, temperature=0.5, max_tokens=2),
    ).json()
    assert_matches(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    prompts = len(tokens(engine, "a b")) + len(tokens(engine, "c d e"))
    assert body["usage"]["prompt_tokens"] == prompts
    assert body["usage"]["completion_tokens"] == 8
    assert_settled(client, engine)


def test_greedy_n_over_a_list_of_prompts(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        "/v1/completions",
        json=completion_body(prompt=["a b", "c d e"], n=2, temperature=0, max_tokens=1),
    ).json()
    assert [c["text"] for c in body["choices"]] == [" one"] * 4
    assert len(engine.core.requests) == 4  # two single greedy requests per prompt
    assert_settled(client, engine)


def test_echo_returns_the_prompt_first(client: TestClient) -> None:
    body = client.post(
        "/v1/completions", json=completion_body(prompt="one two", echo=True, max_tokens=2)
    ).json()
    assert body["choices"][0]["text"] == "one two one two"


def test_logprobs(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(logprobs=2, max_tokens=2)).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" one", " two"]
    assert len(logprobs["token_logprobs"]) == 2
    assert all(len(top) >= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [0, 4]
    assert_matches(body, "CreateCompletionResponse")


def test_logprobs_zero_still_reports_the_sampled_tokens_logprob(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(logprobs=0, max_tokens=2)).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" one", " two"]
    assert all(isinstance(lp, float) for lp in logprobs["token_logprobs"])
    # the sampled token is in its own top entry, as OpenAI and vLLM report it
    assert [list(top) for top in logprobs["top_logprobs"]] == [[" one"], [" two"]]


def test_stop_and_include_stop_str(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(max_tokens=9, stop=" three")).json()
    assert body["choices"][0]["text"] == " one two"
    assert body["choices"][0]["finish_reason"] == "stop"
    included = client.post(
        "/v1/completions",
        json=completion_body(max_tokens=9, stop=" three", include_stop_str_in_output=True),
    ).json()
    assert included["choices"][0]["text"] == " one two three"


def test_logprobs_that_are_not_finite_still_make_valid_json(
    client: TestClient, engine: FakeEngine
) -> None:
    # a JSON-schema mask leaves alternatives at -inf; JSON has no -inf (this was a 500)
    engine.core.masked_alternatives = True
    for path, body in (
        ("/v1/completions", completion_body(logprobs=3, max_tokens=2)),
        ("/v1/completions", completion_body(logprobs=3, max_tokens=2, stream=True)),
        ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=3, max_tokens=2)),
        (
            "/v1/chat/completions",
            chat_body(logprobs=True, top_logprobs=3, max_tokens=2, stream=True),
        ),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        text = response.text
        assert "Infinity" not in text and "NaN" not in text
        if body.get("stream"):
            sse_json(text)  # every chunk is valid JSON
        else:
            json.loads(text)
