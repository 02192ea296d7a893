"""Completions and chat through the official `openai` SDK against the real engine."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from transformers import AutoTokenizer

from sluice.config import Settings
from sluice.engine.models import default_model_dir
from tests.e2e.conftest import ALIAS, LORA, MODEL

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(default_model_dir(Settings().cache_dir)))


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, ALIAS, LORA]  # names, then LoRA adapters
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(LORA).parent == MODEL  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_greedy_answers_and_counts_real_tokens(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=30
    )
    choice = response.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    prompt_ids = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids)
    # The answer's tokens plus the end-of-turn token the model stopped on.
    answer_ids = tokenizer.encode(choice.message.content, add_special_tokens=False)
    assert response.usage.completion_tokens == len(answer_ids) + 1
    assert response.usage.total_tokens == len(prompt_ids) + len(answer_ids) + 1


def test_completion_text_and_usage(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    choice = response.choices[0]
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert choice.text.strip().startswith("Paris")
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 5


def test_identical_greedy_requests_give_identical_output(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    first = client.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].text == second.choices[0].text
    assert len(first.choices[0].text) > 0


def test_max_tokens_one_finishes_with_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=1, temperature=0
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 1


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_completion_tokens=3, temperature=0
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 3


def test_stop_sequence_ends_before_it(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=30, stop=["Paris"]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "The capital of France is "


def test_n2_sampled_gives_two_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, n=2, temperature=0.9, seed=7, max_tokens=12
    )
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert all(c.message.content for c in response.choices)
    assert response.usage is not None
    # Both choices' tokens are counted, each at most max_tokens.
    assert 2 <= response.usage.completion_tokens <= 24


def test_n2_greedy_gives_two_equal_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, n=2, temperature=0, max_tokens=20
    )
    texts = [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == ["The capital of France is Paris."] * 2
    assert response.usage is not None and response.usage.completion_tokens == 2 * 8


def test_prompt_list_and_echo(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    response = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=4, temperature=0, echo=True, n=2
    )
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in response.choices}
    assert by_index[0].startswith(prompts[0]) and by_index[1].startswith(prompts[0])
    assert by_index[2].startswith(prompts[1]) and by_index[3].startswith(prompts[1])


def test_completion_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == 3
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.token_logprobs is not None and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset == [0, len(logprobs.tokens[0]), len("".join(logprobs.tokens[:2]))]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert "".join(item.token for item in content) == response.choices[0].message.content
    # Greedy: the sampled token is the most likely one.
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.bytes == list(item.token.encode())


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema, "strict": True},
        },
    )
    parsed = json.loads(response.choices[0].message.content or "")
    assert set(parsed) == {"city", "country"}
    assert all(isinstance(value, str) for value in parsed.values())


async def test_streaming_chat_with_usage_matches_non_streaming(
    aclient: openai.AsyncOpenAI,
) -> None:
    whole = await aclient.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=30
    )
    stream = await aclient.chat.completions.create(
        model=MODEL,
        messages=CAPITAL,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in content_chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    # (prompt_tokens_details.cached_tokens differs: the second request hits the prefix cache)
    assert [getattr(last.usage, n) for n in counts] == [getattr(whole.usage, n) for n in counts]
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_streaming_completion_n2_with_usage(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.completions.create(
        model=MODEL,
        prompt="My favourite colour is",
        max_tokens=6,
        temperature=0.8,
        seed=1,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    finishes = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert set(finishes) == {0, 1}
    usage = chunks[-1].usage
    assert usage is not None and 2 <= usage.completion_tokens <= 12


async def test_concurrent_requests_are_batched_and_all_answer(
    aclient: openai.AsyncOpenAI,
) -> None:
    async def ask() -> str:
        response = await aclient.chat.completions.create(
            model=MODEL, messages=CAPITAL, temperature=0, max_tokens=30
        )
        return response.choices[0].message.content or ""

    answers = await asyncio.gather(*(ask() for _ in range(6)))
    assert all("Paris" in answer for answer in answers)
