"""Refused requests, as kinds: OpenAI's error shape, the right status and param, no engine
work, and the same answer whether or not the request asked for a stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, assert_settled, chat_body, completion_body
from tests.api.openai_schema import _document
from tests.fake_engine import FakeEngine

LONG_PROMPT = " ".join(["w"] * 520)  # over the fake's 512-token context


@pytest.fixture
def engine(module_engine: FakeEngine) -> FakeEngine:
    return module_engine


@pytest.fixture
def client(module_client: TestClient, module_engine: FakeEngine) -> Iterator[TestClient]:
    """One app for the module: these tests leave nothing behind, as each checks."""
    yield module_client
    assert_settled(module_client, module_engine)


@pytest.fixture
def refusal(engine: FakeEngine) -> Iterator[None]:
    """The test's requests are refused before the engine core sees them."""
    seen = len(engine.core.requests)
    yield
    assert len(engine.core.requests) == seen


def post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, json=body)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
@pytest.mark.usefixtures("refusal")
def test_malformed_json_is_400_not_422(client: TestClient, path: str) -> None:
    response = client.post(
        path, content=b'{"model": "fake-model", ', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert error["message"].startswith("We could not parse the JSON body of your request.")


@pytest.mark.usefixtures("refusal")
def test_missing_prompt(client: TestClient) -> None:
    error = assert_error(
        post(client, "/v1/completions", {"model": "fake-model"}), 400, param="prompt"
    )
    assert "prompt" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "fake-model"}, "messages"),
        ("/v1/chat/completions", chat_body(messages=[{"content": "hi"}]), "messages.0.role"),
        ("/v1/responses", {"model": "fake-model"}, "input"),
    ],
)
@pytest.mark.usefixtures("refusal")
def test_missing_field(client: TestClient, path: str, body: Any, param: str) -> None:
    error = assert_error(post(client, path, body), 400, param=param)
    assert error["message"] == f"Missing required parameter: '{param}'."


# Each invalid value is refused with a 400 that names the field, streaming or not.
INVALID = [
    # vLLM's own validators assume shapes; a wrong one is the body's fault, never a 500
    ("/v1/chat/completions", chat_body(structured_outputs=False), None),
    ("/v1/completions", completion_body(structured_outputs=1), None),
    ("/v1/completions", completion_body(max_tokens=5.5), "max_tokens"),
    ("/v1/completions", completion_body(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion_body(temperature=-0.1), "temperature"),
    ("/v1/completions", completion_body(temperature="hot"), "temperature"),
    ("/v1/completions", completion_body(top_p=0), "top_p"),
    ("/v1/completions", completion_body(top_p=1.5), "top_p"),
    ("/v1/completions", completion_body(model=5), "model"),
    ("/v1/completions", completion_body(prompt=5), "prompt"),
    ("/v1/completions", completion_body(prompt=""), "prompt"),
    ("/v1/completions", completion_body(prompt=[10**9]), None),  # out of vocabulary
    ("/v1/completions", completion_body(seed=2**64), "seed"),
    ("/v1/completions", completion_body(seed=-(2**63) - 1), "seed"),
    ("/v1/completions", completion_body(logit_bias={"abc": 1}), "logit_bias"),
    ("/v1/completions", completion_body(logit_bias={"99999999": 1}), "logit_bias"),
    ("/v1/completions", completion_body(logprobs=-1), "logprobs"),
    ("/v1/chat/completions", chat_body(messages="hi"), "messages"),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": 5}]),
        "messages.0.content",
    ),
    ("/v1/chat/completions", chat_body(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", chat_body(top_logprobs=21, logprobs=True), "logprobs"),
    ("/v1/chat/completions", chat_body(response_format={"type": "xml"}), "response_format.type"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema"}), "response_format"),
    (
        "/v1/chat/completions",
        chat_body(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "bogus"}},
            }
        ),
        None,
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("path", "body", "param"), INVALID)
@pytest.mark.usefixtures("refusal")
def test_invalid_value(
    client: TestClient, path: str, body: Any, param: str | None, stream: bool
) -> None:
    # A request that is invalid is invalid before the stream starts: same status, no 200.
    body = {**body, "stream": stream} if stream else body
    assert_error(post(client, path, body), 400, param=param, code=None)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", completion_body(prompt=LONG_PROMPT, max_tokens=10)),
        (
            "/v1/chat/completions",
            chat_body(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=10),
        ),
    ],
)
@pytest.mark.usefixtures("refusal")
def test_context_overflow(client: TestClient, path: str, body: Any, stream: bool) -> None:
    body = {**body, "stream": stream}
    error = assert_error(
        post(client, path, body), 400, param="input_tokens", code="context_length_exceeded"
    )
    assert "maximum context length is 512 tokens" in error["message"]


@pytest.mark.usefixtures("refusal")
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_without_a_stream_are_refused(client: TestClient, path: str) -> None:
    body = completion_body() if "chat" not in path else chat_body()
    body.update(stream=False, stream_options={"include_usage": True})
    assert_error(post(client, path, body), 400, param="stream_options")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", completion_body(frobnicate=1)),
        ("/v1/chat/completions", chat_body(frobnicate=1)),
        ("/v1/responses", {"model": "fake-model", "input": "hi", "frobnicate": 1}),
        ("/tokenize", {"model": "fake-model", "prompt": "hi", "frobnicate": 1}),
    ],
)
@pytest.mark.usefixtures("refusal")
def test_unknown_fields_are_refused_by_name(client: TestClient, path: str, body: Any) -> None:
    error = assert_error(
        post(client, path, body), 400, param="frobnicate", code="unknown_parameter"
    )
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("modalities", ["text", "audio"]),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("service_tier", "flex"),
        ("use_beam_search", True),
        ("length_penalty", 2.0),  # beam search's alone: it would be ignored
    ],
)
@pytest.mark.usefixtures("refusal")
def test_features_this_server_lacks_are_refused(client: TestClient, field: str, value: Any) -> None:
    error = assert_error(
        post(client, "/v1/chat/completions", chat_body(**{field: value})),
        400,
        param=field,
        code="unsupported_value",
    )
    assert field in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", {"team": "a"}),
        ("store", False),
        ("service_tier", "auto"),
        ("safety_identifier", "user-1"),
        ("prompt_cache_key", "k"),
        ("modalities", ["text"]),
        ("user", "u"),
        ("parallel_tool_calls", True),
    ],
)
def test_openai_fields_that_do_not_change_the_answer_are_accepted(
    client: TestClient, field: str, value: Any
) -> None:
    response = post(client, "/v1/chat/completions", chat_body(**{field: value}))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", 5),
        ("metadata", {"team": 1}),
        ("metadata", {f"k{i}": "v" for i in range(17)}),
        ("safety_identifier", []),
        ("safety_identifier", "x" * 65),
        ("prompt_cache_key", 1e30),
        ("prediction", 5),
        ("prediction", {"type": "other"}),
        ("store", 0),  # not `false`
        ("modalities", {"text": 1}),
        ("best_of", True),
        ("service_tier", 0),
    ],
)
@pytest.mark.usefixtures("refusal")
def test_openai_fields_of_the_wrong_type_are_refused(
    client: TestClient, field: str, value: Any
) -> None:
    # the types OpenAI's API description gives them, not whatever Python compares equal
    error = assert_error(
        post(client, "/v1/chat/completions", chat_body(**{field: value})),
        400,
        param=field,
        code="invalid_type",
    )
    assert error["message"].startswith(f"Invalid type for '{field}': expected ")


DEEP = 1500  # deeper than Python's parser recurses (1000), within the 4 KiB body limit


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"]
)
@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "fake-model", "prompt": "hi", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"model": "fake-model", "prompt": "hi", "temperature": NaN}',
        b'{"model": "fake-model", "prompt": "hi", "top_p": -Infinity}',
    ],
    ids=["nested", "nan", "infinity"],
)
@pytest.mark.usefixtures("refusal")
def test_bodies_that_are_not_json_are_400_and_the_connection_lives(
    client: TestClient, path: str, content: bytes
) -> None:
    # JSON has no NaN or Infinity (RFC 8259); nesting past the parser's depth is not a 500
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    assert error["message"].startswith("We could not parse the JSON body of your request")
    assert client.get("/v1/models").status_code == 200


@pytest.mark.usefixtures("refusal")
def test_an_unknown_model_on_the_embeddings_endpoint_is_404(client: TestClient) -> None:
    # not "this model does not embed": there is no such model
    body = {"model": "nope", "input": "x"}
    assert_error(post(client, "/v1/embeddings", body), 404, param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(max_completion_tokens=0), "max_completion_tokens"),
        ("/v1/chat/completions", chat_body(max_tokens=0), "max_tokens"),
        ("/v1/responses", {"model": "fake-model", "input": "hi", "max_output_tokens": 0}, None),
        (
            "/v1/responses",
            {"model": "fake-model", "input": "hi", "previous_response_id": "resp_nope"},
            "previous_response_id",
        ),
    ],
)
def test_errors_name_the_field_as_the_client_sent_it(
    client: TestClient, path: str, body: Any, param: str | None
) -> None:
    response = post(client, path, body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    named = param or "max_output_tokens"
    if param is None:  # vLLM's own bound, under its own name inside: the client's name out
        assert error["param"] in (None, named), error
        assert "max_tokens" not in error["message"], error
    else:
        assert error["param"] == named, error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),  # nothing is stored (vLLM's response store is off)
        ("previous_response_id", "resp_abc"),
        ("service_tier", "flex"),
        ("tools", [{"type": "web_search"}]),  # a built-in tool: no tool server to run it
    ],
)
@pytest.mark.usefixtures("refusal")
def test_responses_fields_this_server_cannot_honour_are_refused(
    client: TestClient, field: str, value: Any
) -> None:
    body = {"model": "fake-model", "input": "hi", field: value}
    error = assert_error(
        post(client, "/v1/responses", body), 400, param=field, code="unsupported_value"
    )
    assert field in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/completions",
            completion_body(prompt=LONG_PROMPT, max_tokens=10, truncate_prompt_tokens=-1),
        ),
        (
            "/v1/chat/completions",
            chat_body(
                messages=[{"role": "user", "content": LONG_PROMPT}],
                max_tokens=10,
                truncate_prompt_tokens=-1,
            ),
        ),
        (
            "/v1/responses",
            {
                "model": "fake-model",
                "input": LONG_PROMPT,
                "max_output_tokens": 10,
                "truncation": "auto",
            },
        ),
    ],
    ids=["completions", "chat", "responses"],
)
def test_a_prompt_the_body_asks_to_truncate_is_served(
    client: TestClient, path: str, body: Any
) -> None:
    # vLLM cuts the prompt to the context; the output gets the room left, as vLLM serves it
    response = post(client, path, body)
    assert response.status_code == 200, response.text


def test_context_overflow_names_the_clients_field(client: TestClient) -> None:
    prompt = " ".join(["w"] * 480)  # fits the fake's 512-token context, with 60 more does not
    body = chat_body(messages=[{"role": "user", "content": prompt}], max_completion_tokens=60)
    assert_error(
        post(client, "/v1/chat/completions", body),
        400,
        param="max_completion_tokens",
        code="context_length_exceeded",
    )


def _nullable_fields(schema_name: str) -> list[str]:
    """The request fields OpenAI's API description lets a client send as `null`."""
    schemas = _document()["components"]["schemas"]

    def properties(schema: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = dict(schema.get("properties", {}))
        for part in schema.get("allOf", []):
            target = schemas[part["$ref"].rsplit("/", 1)[1]] if "$ref" in part else part
            found.update(properties(target))
        return found

    def allows_null(schema: dict[str, Any]) -> bool:
        if "$ref" in schema:
            return allows_null(schemas[schema["$ref"].rsplit("/", 1)[1]])
        kinds = schema.get("type")
        if kinds == "null" or (isinstance(kinds, list) and "null" in kinds):
            return True
        return any(allows_null(s) for s in schema.get("anyOf", []) + schema.get("oneOf", []))

    return sorted(n for n, s in properties(schemas[schema_name]).items() if allows_null(s))


@pytest.mark.parametrize("field", _nullable_fields("CreateChatCompletionRequest"))
def test_nullable_chat_fields_accept_null(client: TestClient, field: str) -> None:
    body = chat_body()
    body[field] = None
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field", _nullable_fields("CreateCompletionRequest"))
def test_nullable_completion_fields_accept_null(client: TestClient, field: str) -> None:
    body = completion_body()
    body[field] = None
    response = post(client, "/v1/completions", body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field", _nullable_fields("CreateResponse"))
def test_nullable_responses_fields_accept_null(client: TestClient, field: str) -> None:
    """`/v1/responses` (vLLM's request model under sluice's): null is the field's default.
    vLLM refused `service_tier: null` and failed `background`/`truncation` null after the
    engine ran (a 400 for spent tokens)."""
    body: dict[str, Any] = {"model": chat_body()["model"], "input": "hi", "max_output_tokens": 2}
    body[field] = None
    response = post(client, "/v1/responses", body)
    assert response.status_code == 200, response.text


def test_the_nullable_lists_are_not_vacuous() -> None:
    chat = _nullable_fields("CreateChatCompletionRequest")
    assert {"n", "stream", "logprobs", "temperature", "stop"} <= set(chat)
    assert {"n", "stream", "echo", "logprobs"} <= set(_nullable_fields("CreateCompletionRequest"))
    responses = set(_nullable_fields("CreateResponse"))
    assert {"background", "service_tier", "truncation", "stream", "temperature"} <= responses


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "fake-model", "prompt": "\\ud800", "max_tokens": 1}',
        b'{"model": "fake-model", "prompt": "a\\udfffb", "max_tokens": 1}',
        b'{"model": "\\ud800", "prompt": "x"}',
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\udc00"}]}',
        b'{"model": "fake-model", "prompt": "\xed\xa0\x80"}',  # a surrogate as raw UTF-8 bytes
        b'{"model": "fake-model", "prompt": "\xff"}',
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_text_that_is_not_unicode_is_a_400_and_the_connection_lives(
    client: TestClient, raw: bytes, path: str
) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)
    assert post(client, "/v1/completions", completion_body(max_tokens=1)).status_code == 200


def test_surrogate_pairs_are_text(client: TestClient) -> None:
    raw = b'{"model": "fake-model", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    response = client.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body", [[1, 2], "text", 5], ids=["array", "string", "number"])
@pytest.mark.usefixtures("refusal")
def test_body_that_is_not_an_object(client: TestClient, body: Any) -> None:
    error = assert_error(post(client, "/v1/completions", body), 400)
    assert "JSON object" in error["message"]


@pytest.mark.parametrize("content", [b"", b"null"], ids=["empty", "null"])
@pytest.mark.usefixtures("refusal")
def test_missing_body_is_400(client: TestClient, content: bytes) -> None:
    response = client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert "'None'" not in error["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.usefixtures("refusal")
def test_unknown_model(client: TestClient, path: str, stream: bool) -> None:
    body = completion_body(model="gpt-4") if "chat" not in path else chat_body(model="gpt-4")
    body["stream"] = stream
    error = assert_error(post(client, path, body), 404, param="model", code="model_not_found")
    assert "gpt-4" in error["message"]
    assert "fake-model" in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.usefixtures("refusal")
def test_n_over_cap(client: TestClient, path: str) -> None:
    body = completion_body(n=5) if "chat" not in path else chat_body(n=5)
    error = assert_error(post(client, path, body), 400, param="n")
    assert "n=5" in error["message"]


@pytest.mark.usefixtures("refusal")
def test_too_many_prompts(client: TestClient) -> None:
    body = completion_body(prompt=["a"] * 17)
    assert_error(post(client, "/v1/completions", body), 400, param="prompt")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/completions", "max_tokens"),
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/responses", "max_output_tokens"),
    ],
)
@pytest.mark.usefixtures("refusal")
def test_max_tokens_over_cap(client: TestClient, path: str, field: str) -> None:
    body: dict[str, Any] = (
        completion_body()
        if "completions" in path and "chat" not in path
        else chat_body()
        if "chat" in path
        else {"model": "fake-model", "input": "hi"}
    )
    body[field] = 65
    error = assert_error(post(client, path, body), 400, param=field)
    assert "(64)" in error["message"]


@pytest.mark.usefixtures("refusal")
def test_embeddings_on_a_generative_model(client: TestClient) -> None:
    response = post(client, "/v1/embeddings", {"model": "fake-model", "input": "hi"})
    assert_error(response, 400, code="not_supported")


def test_unknown_url(client: TestClient) -> None:
    error = assert_error(client.get("/v1/nothing-here"), 404, code="http_404")
    assert error["message"] == "Unknown URL. Check the path of your request."


def test_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/completions"), 405, code="http_405")


def test_unknown_model_id_on_models_route(client: TestClient) -> None:
    assert_error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")
