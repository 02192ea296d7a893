"""POST /v1/completions, non-streaming: shapes, fan-out, finish reasons, usage."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, assert_settled, completion_body
from tests.api.openai_schema import assert_matches
from tests.fake_engine import MODEL_ID, FakeEngine


def test_shape(client: TestClient, engine: FakeEngine) -> None:
    before = int(time.time())
    response = client.post("/v1/completions", json=completion_body(max_tokens=3))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_matches(body, "CreateCompletionResponse")
    assert body["id"].startswith("cmpl-")
    assert len(body["id"]) > len("cmpl-")
    assert body["object"] == "text_completion"
    assert before <= body["created"] <= int(time.time())
    assert body["model"] == MODEL_ID
    assert body["choices"] == [
        {"index": 0, "text": " w0_0 w0_1 w0_2", "logprobs": None, "finish_reason": "length"}
    ]
    # the fake counts one token per word of the prompt and one per generated piece
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert_settled(client, engine)
    assert engine.aborted == []  # finished requests need no abort


def test_ids_differ_between_requests(client: TestClient) -> None:
    ids = {client.post("/v1/completions", json=completion_body()).json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_engine_receives_the_token_ids_and_sampling(client: TestClient, engine: FakeEngine) -> None:
    client.post(
        "/v1/completions",
        json=completion_body(prompt="aa b", max_tokens=2, temperature=0.5, top_p=0.5, seed=3),
    )
    (request,) = engine.requests
    assert request.prompt_token_ids == (2, 1)
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (
        2,
        0.5,
        0.5,
        3,
    )


def test_prompt_list_with_n_gives_indexed_choices(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions",
        json=completion_body(prompt=["a b", "c d e"], n=2, max_tokens=2),
    )
    assert response.status_code == 200
    body = response.json()
    assert_matches(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # per prompt, the fake writes choice j as " w{j}_0 w{j}_1"
    assert [c["text"] for c in body["choices"]] == [
        " w0_0 w0_1",
        " w1_0 w1_1",
        " w0_0 w0_1",
        " w1_0 w1_1",
    ]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    assert [r.sampling.n for r in engine.requests] == [2, 2]
    assert_settled(client, engine)


def test_greedy_n_fans_out_at_the_engine(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions",
        json=completion_body(prompt=["a", "b"], n=2, temperature=0, max_tokens=1),
    )
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [" w0_0"] * 4  # greedy: equal choices
    assert len(engine.requests) == 4
    assert all(r.sampling.n == 1 for r in engine.requests)
    assert len({r.request_id for r in engine.requests}) == 4
    assert engine.aborted == []
    assert_settled(client, engine)


def test_stop_sequence(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=10, stop="w0_2"))
    body = response.json()
    assert body["choices"][0]["text"] == " w0_0 w0_1 "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3
    assert engine.requests[0].sampling.stop == ("w0_2",)
    assert_settled(client, engine)


def test_max_tokens_1_is_length(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(max_tokens=1)).json()
    assert body["choices"][0]["text"] == " w0_0"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


def test_default_max_tokens_is_16(client: TestClient, engine: FakeEngine) -> None:
    body = completion_body()
    del body["max_tokens"]
    assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 16


def test_default_max_tokens_shrinks_to_the_room_left(client: TestClient) -> None:
    body = completion_body(prompt=" ".join(["w"] * 250))
    del body["max_tokens"]
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"] == {
        "prompt_tokens": 250,
        "completion_tokens": 6,
        "total_tokens": 256,
    }


def test_prompt_may_fill_the_context_exactly(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json=completion_body(prompt=" ".join(["w"] * 252), max_tokens=4)
    )
    assert response.status_code == 200
    assert response.json()["usage"]["total_tokens"] == 256


def test_echo(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(max_tokens=1, echo=True)).json()
    assert body["choices"][0]["text"] == "one two three w0_0"


def test_logprobs(client: TestClient) -> None:
    body = client.post("/v1/completions", json=completion_body(max_tokens=2, logprobs=2)).json()
    assert_matches(body, "CreateCompletionResponse")
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" w0_0", " w0_1"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"alt0": -1.0, "alt1": -2.0}, {"alt0": -1.0, "alt1": -2.0}],
        "text_offset": [0, 5],
    }


def test_integer_sampling_values_are_accepted(client: TestClient) -> None:
    # SDKs send temperature=0 / top_p=1 as JSON integers; strict validation must accept them
    response = client.post("/v1/completions", json=completion_body(temperature=0, top_p=1))
    assert response.status_code == 200


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json=completion_body(best_of=1, suffix=None, metadata={"a": "b"})
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}],
    ids=["none", "text", "form"],
)
def test_json_without_json_content_type_is_a_400(
    client: TestClient, engine: FakeEngine, headers: dict[str, str]
) -> None:
    # FastAPI only parses JSON bodies declared as JSON (strict_content_type, against CSRF);
    # `curl -d` without `-H` lands here and must get a 400 in OpenAI's shape, not 422 or 500.
    response = client.post(
        "/v1/completions", content=json.dumps(completion_body()).encode(), headers=headers
    )
    assert_error(response, 400)
    assert engine.requests == []


def test_json_content_type_with_charset_is_parsed(client: TestClient) -> None:
    response = client.post(
        "/v1/completions",
        content=json.dumps(completion_body()).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200
