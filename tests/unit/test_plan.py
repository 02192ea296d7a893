"""Planning: OpenAI bodies -> GenerationJob (fan-out, defaults, structured output, roles)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from sluice.api.plan import GenerationJob, plan_chat, plan_completion
from sluice.api.schemas import ChatCompletionRequest, CompletionRequest
from sluice.config import Settings
from sluice.engine.protocol import StructuredOutput
from sluice.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from tests.fake_engine import MODEL_ID, FakeEngine

LIMITS = {"max_tokens_cap": 64, "max_n": 4, "max_prompts": 3}


@dataclass
class RecordingEngine(FakeEngine):
    """The fake engine, also keeping what it was asked to render and tokenize."""

    rendered: list[list[dict[str, str]]] = field(default_factory=list)
    tokenized: list[tuple[str, bool]] = field(default_factory=list)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        self.rendered.append([dict(m) for m in messages])
        return super().render_chat(messages)

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.tokenized.append((text, add_special_tokens))
        return super().tokenize(text, add_special_tokens=add_special_tokens)


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine(ready=True)


@pytest.fixture
def settings() -> Settings:
    return Settings(_env_file=None, model="fake", limits=LIMITS)  # type: ignore[call-arg]


def completion(engine: FakeEngine, settings: Settings, **fields: Any) -> GenerationJob:
    body = CompletionRequest.model_validate({"model": MODEL_ID, "prompt": "aa b ccc", **fields})
    return plan_completion(body, engine, settings)


def chat(engine: FakeEngine, settings: Settings, **fields: Any) -> GenerationJob:
    body = ChatCompletionRequest.model_validate(
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi there"}], **fields}
    )
    return plan_chat(body, engine, settings)


# --- completions ---------------------------------------------------------------------------


def test_completion_single_prompt(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, max_tokens=5)
    assert job.kind == "text_completion"
    assert job.response_id.startswith("cmpl-")
    assert job.model == MODEL_ID
    assert job.n == 1
    assert job.prompt_tokens == 3
    assert job.requests[0].sampling.max_tokens == 5
    assert (job.stream, job.include_usage, job.echo_texts, job.logprobs) == (
        False,
        False,
        None,
        False,
    )
    assert len(job.requests) == 1
    request = job.requests[0]
    assert request.request_id == f"{job.response_id}-0"
    assert request.prompt_token_ids == (2, 1, 3)  # the fake's "token ids" are word lengths
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.n, sampling.temperature, sampling.top_p) == (
        5,
        1,
        1.0,
        1.0,
    )
    assert sampling.stop == ()
    assert sampling.logprobs is None
    assert sampling.structured is None
    assert job.choice_count == 1


def test_completion_default_max_tokens_is_16(engine: FakeEngine, settings: Settings) -> None:
    assert completion(engine, settings).requests[0].sampling.max_tokens == 16


def test_completion_default_max_tokens_clipped_by_context(settings: Settings) -> None:
    small = FakeEngine(max_model_len=20, ready=True)
    job = completion(small, settings, prompt=" ".join(["w"] * 15))
    assert job.requests[0].sampling.max_tokens == 5


def test_prompt_list_fans_out_one_request_per_prompt(
    engine: FakeEngine, settings: Settings
) -> None:
    job = completion(engine, settings, prompt=["a", "bb cc"], n=2, max_tokens=4)
    assert [r.request_id for r in job.requests] == [
        f"{job.response_id}-0",
        f"{job.response_id}-1",
    ]
    assert [r.prompt_token_ids for r in job.requests] == [(1,), (2, 2)]
    assert [r.sampling.n for r in job.requests] == [2, 2]
    assert job.prompt_tokens == 3
    assert job.choice_count == 4
    assert job.n == 2


def test_prompt_list_budgets_are_per_prompt(settings: Settings) -> None:
    small = FakeEngine(max_model_len=20, ready=True)
    job = completion(small, settings, prompt=["w", " ".join(["w"] * 15)])
    assert [r.sampling.max_tokens for r in job.requests] == [16, 5]
    assert job.requests[0].sampling.max_tokens == 16


def test_greedy_n_fans_out_into_single_requests(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, n=3, temperature=0, max_tokens=2)
    rid = job.response_id
    assert [r.request_id for r in job.requests] == [f"{rid}-0-0", f"{rid}-0-1", f"{rid}-0-2"]
    assert all(r.sampling.n == 1 for r in job.requests)
    assert all(r.sampling.temperature == 0 for r in job.requests)
    assert all(r.prompt_token_ids == (2, 1, 3) for r in job.requests)
    assert job.n == 3
    assert job.choice_count == 3


def test_greedy_fan_out_with_a_prompt_list(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, prompt=["a", "b"], n=2, temperature=0.0)
    rid = job.response_id
    assert [r.request_id for r in job.requests] == [
        f"{rid}-0-0",
        f"{rid}-0-1",
        f"{rid}-1-0",
        f"{rid}-1-1",
    ]
    assert job.choice_count == 4


@pytest.mark.parametrize("temperature", [None, 0.7, 2.0])
def test_sampled_n_stays_one_request(
    engine: FakeEngine, settings: Settings, temperature: float | None
) -> None:
    fields: dict[str, Any] = {"n": 3}
    if temperature is not None:
        fields["temperature"] = temperature
    job = completion(engine, settings, **fields)
    assert len(job.requests) == 1
    assert job.requests[0].request_id == f"{job.response_id}-0"
    assert job.requests[0].sampling.n == 3


def test_greedy_n_1_is_not_fanned_out(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, temperature=0)
    assert [r.request_id for r in job.requests] == [f"{job.response_id}-0"]


def test_sampling_fields_pass_through(engine: FakeEngine, settings: Settings) -> None:
    job = completion(
        engine,
        settings,
        temperature=0.5,
        top_p=0.9,
        stop=["x", "y"],
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=2,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    sampling = job.requests[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.5, 0.9, 42)
    assert sampling.stop == ("x", "y")
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert sampling.logprobs == 2
    assert job.logprobs is True
    assert job.echo_texts == ("aa b ccc",)
    assert (job.stream, job.include_usage) == (True, True)
    assert (job.requests[0].sampling.temperature, job.requests[0].sampling.top_p) == (0.5, 0.9)


def test_stop_string_becomes_a_tuple(engine: FakeEngine, settings: Settings) -> None:
    assert completion(engine, settings, stop="\n").requests[0].sampling.stop == ("\n",)
    assert completion(engine, settings, stop="").requests[0].sampling.stop == ()


def test_include_usage_needs_stream(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, stream_options={"include_usage": True})
    assert job.include_usage is False


def test_logprobs_zero_is_on(engine: FakeEngine, settings: Settings) -> None:
    job = completion(engine, settings, logprobs=0)
    assert job.logprobs is True
    assert job.requests[0].sampling.logprobs == 0


def test_completion_refusals(engine: FakeEngine, settings: Settings) -> None:
    with pytest.raises(ModelNotFound):
        completion(engine, settings, model="gpt-4")
    with pytest.raises(InvalidRequest) as n_info:
        completion(engine, settings, n=5)
    assert n_info.value.param == "n"
    with pytest.raises(InvalidRequest) as prompts_info:
        completion(engine, settings, prompt=["a", "b", "c", "d"])
    assert prompts_info.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded) as ctx_info:
        completion(engine, settings, prompt=" ".join(["w"] * 250), max_tokens=10)
    assert ctx_info.value.param == "prompt"
    with pytest.raises(InvalidRequest) as cap_info:
        completion(engine, settings, max_tokens=65)
    assert cap_info.value.param == "max_tokens"
    assert engine.requests == []  # planning never touches generation


# --- chat --------------------------------------------------------------------------------------


def test_chat_job(engine: RecordingEngine, settings: Settings) -> None:
    job = chat(engine, settings, max_tokens=7)
    assert job.kind == "chat"
    assert job.response_id.startswith("chatcmpl-")
    assert job.echo_texts is None
    assert job.logprobs is False
    assert engine.rendered == [[{"role": "user", "content": "hi there"}]]
    # the rendered template holds its own special tokens
    assert engine.tokenized == [("<user> hi there <assistant>", False)]
    assert job.prompt_tokens == 4
    (request,) = job.requests
    assert request.request_id == job.response_id
    assert request.prompt_token_ids == (6, 2, 5, 11)
    assert request.sampling.max_tokens == 7


def test_chat_default_max_tokens_is_remaining_context_capped(
    engine: FakeEngine, settings: Settings
) -> None:
    assert chat(engine, settings).requests[0].sampling.max_tokens == 64
    small = FakeEngine(max_model_len=10, ready=True)
    assert chat(small, settings).requests[0].sampling.max_tokens == 6


def test_developer_role_becomes_system(engine: RecordingEngine, settings: Settings) -> None:
    chat(
        engine,
        settings,
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}],
            },
            {"role": "assistant", "content": None},
        ],
    )
    assert engine.rendered == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi you"},
            {"role": "assistant", "content": ""},
        ]
    ]


def test_max_completion_tokens_wins_over_max_tokens(engine: FakeEngine, settings: Settings) -> None:
    job = chat(engine, settings, max_tokens=10, max_completion_tokens=3)
    assert job.requests[0].sampling.max_tokens == 3
    assert job.requests[0].sampling.max_tokens == 3


def test_max_completion_tokens_over_cap_names_itself(
    engine: FakeEngine, settings: Settings
) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(engine, settings, max_tokens=10, max_completion_tokens=65)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest) as info:
        chat(engine, settings, max_tokens=65)
    assert info.value.param == "max_tokens"


def test_chat_greedy_n_fans_out(engine: FakeEngine, settings: Settings) -> None:
    job = chat(engine, settings, n=2, temperature=0)
    assert [r.request_id for r in job.requests] == [
        f"{job.response_id}-0",
        f"{job.response_id}-1",
    ]
    assert all(r.sampling.n == 1 for r in job.requests)
    assert job.choice_count == 2


def test_chat_sampled_n_stays_one_request(engine: FakeEngine, settings: Settings) -> None:
    job = chat(engine, settings, n=2, temperature=0.8)
    assert len(job.requests) == 1
    assert job.requests[0].sampling.n == 2


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, StructuredOutput(json_schema=None)),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "city",
                    "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
            StructuredOutput(
                json_schema={"type": "object", "properties": {"city": {"type": "string"}}}
            ),
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "anything"}},
            StructuredOutput(json_schema={"type": "object"}),
        ),
    ],
    ids=["absent", "text", "json_object", "json_schema", "json_schema-empty"],
)
def test_response_format(
    engine: FakeEngine,
    settings: Settings,
    response_format: dict[str, Any] | None,
    expected: StructuredOutput | None,
) -> None:
    fields = {} if response_format is None else {"response_format": response_format}
    assert chat(engine, settings, **fields).requests[0].sampling.structured == expected


@pytest.mark.parametrize(
    ("fields", "logprobs"),
    [({}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3)],
)
def test_chat_logprobs(
    engine: FakeEngine, settings: Settings, fields: dict[str, Any], logprobs: int | None
) -> None:
    job = chat(engine, settings, **fields)
    assert job.requests[0].sampling.logprobs == logprobs
    assert job.logprobs is (logprobs is not None)


def test_chat_context_overflow_names_messages(settings: Settings) -> None:
    small = FakeEngine(max_model_len=4, ready=True)
    with pytest.raises(ContextLengthExceeded) as info:
        chat(small, settings)
    assert info.value.param == "messages"


def test_chat_refusals(engine: FakeEngine, settings: Settings) -> None:
    with pytest.raises(ModelNotFound):
        chat(engine, settings, model="nope")
    with pytest.raises(InvalidRequest) as info:
        chat(engine, settings, n=5)
    assert info.value.param == "n"


async def test_reindexed_deltas_keep_every_field() -> None:
    from sluice.api.run import _reindexed
    from sluice.engine.protocol import Delta, GenerationRequest, SamplingOptions

    async def one() -> AsyncIterator[Delta]:
        yield Delta(index=1, text="x", token_count=1, finish_reason="stop", queue_s=0.25)

    request = GenerationRequest("r", (1,), SamplingOptions(max_tokens=1, n=2))
    unfinished = {"r"}
    (delta,) = [d async for d in _reindexed(one(), base=4, request=request, unfinished=unfinished)]
    assert delta == Delta(index=5, text="x", token_count=1, finish_reason="stop", queue_s=0.25)
    assert unfinished == {"r"}  # one of two choices finished
