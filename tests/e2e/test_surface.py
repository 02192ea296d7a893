"""vLLM's OpenAI surface on the real engine, through the official `openai` SDK: tool calling
(required, named, auto, parallel, streamed), reasoning output, LoRA adapters, aliases, the
Responses API, prompt-token details, and the request kinds of issue 11 that need real
logits (prompt logprobs with echo, masked alternatives under a JSON schema, logit_bias)."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import ALIAS, LORA, MODEL
from tests.e2e.server import SluiceProcess

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."


def weather_tool(strict: bool = False) -> dict[str, Any]:
    city: dict[str, Any] = {"type": "string"}
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"city": city},
        "required": ["city"],
    }
    if strict:  # the model is tiny: pin the arguments down so the forced call ends
        city["enum"] = ["Paris", "London"]
        parameters["additionalProperties"] = False
    function: dict[str, Any] = {"name": "get_weather", "parameters": parameters}
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def call_text(name: str) -> str:
    """The regex of one Hermes tool call (what vLLM's hermes parser reads)."""
    return (
        '<tool_call>\\n\\{"name": "' + name + '", "arguments": \\{"city": "Paris"\\}\\}\\n'
        "</tool_call>"
    )


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_forced_tool_calls(client: openai.OpenAI, tool_choice: Any) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=[weather_tool(strict=True)],  # type: ignore[list-item]
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=100,
    )
    (call,) = response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert response.choices[0].finish_reason in ("tool_calls", "stop")


def test_auto_tool_calls_parallel_and_streamed(client: openai.OpenAI) -> None:
    regex = call_text("get_weather") + "\\n" + call_text("get_time")
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [weather_tool(), TIME_TOOL],
        "tool_choice": "auto",
        "temperature": 0,
        "max_tokens": 120,
        "extra_body": {"structured_outputs": {"regex": regex}},
    }
    response = client.chat.completions.create(**kwargs)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert all(
        json.loads(c.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        for c in message.tool_calls or []
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function and delta.function.name:
                names[delta.index] = delta.function.name
            if delta.function and delta.function.arguments:
                arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert names == {0: "get_weather", 1: "get_time"}
    assert [json.loads(arguments[i]) for i in (0, 1)] == [{"city": "Paris"}] * 2
    assert finish == "tool_calls"


def test_reasoning_output(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "temperature": 0,
        "max_tokens": 80,
        "extra_body": {
            "chat_template_kwargs": {"enable_thinking": True},
            "structured_outputs": {"regex": "<think>I add 2 and 2\\.</think>The answer is 4\\."},
        },
    }
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.content == "The answer is 4."
    assert message.reasoning == "I add 2 and 2."  # type: ignore[attr-defined]
    reasoning = ""
    content = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning", None) or ""
            content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == ("I add 2 and 2.", "The answer is 4.")


def test_alias_and_lora_are_model_ids(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS, LORA]
    by_alias = client.chat.completions.create(
        model=ALIAS, messages=CAPITAL, temperature=0, max_tokens=20
    )
    assert by_alias.choices[0].message.content == PARIS
    assert by_alias.model == MODEL  # vLLM answers with the canonical (first) name


def test_a_lora_adapter_changes_the_answer_and_leaves_the_base_alone(
    client: openai.OpenAI,
) -> None:
    def ask(model: str) -> str:
        answer = client.chat.completions.create(
            model=model, messages=CAPITAL, temperature=0, max_tokens=12
        )
        return answer.choices[0].message.content or ""

    assert ask(MODEL) == PARIS
    adapted = ask(LORA)
    assert adapted and adapted != PARIS
    # base and adapter requests batched together: the base keeps its answer (engine/cpu_lora)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [MODEL, LORA, MODEL, LORA]))
    assert answers == [PARIS, adapted, PARIS, adapted]


def test_responses_api(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=20
    )
    assert response.output_text == PARIS
    assert response.usage is not None and response.usage.output_tokens > 0
    streamed = "".join(
        event.delta
        for event in client.responses.create(
            model=MODEL,
            input="What is the capital of France?",
            temperature=0,
            max_output_tokens=20,
            stream=True,
        )
        if event.type == "response.output_text.delta"
    )
    assert streamed == PARIS


def test_cached_tokens_are_reported(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "Tell me about rivers. " * 40}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)  # type: ignore[arg-type]
    second = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= second.usage.prompt_tokens // 2


def test_echo_with_prompt_logprobs(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens).startswith(prompt)
    assert logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(isinstance(lp, float) for lp in logprobs.token_logprobs[1:])


def test_logprobs_zero_reports_the_sampled_token(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=0
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert all(isinstance(lp, float) for lp in logprobs.token_logprobs or [])
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert token in top


def test_json_schema_with_top_logprobs(client: openai.OpenAI) -> None:
    # masked alternatives have -inf logprobs; JSON cannot carry them (was a 500)
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city."}],
        temperature=0,
        max_tokens=30,
        logprobs=True,
        top_logprobs=5,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "city",
                "schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    for item in content:
        assert all(alt.logprob > float("-inf") for alt in item.top_logprobs)


def test_logit_bias_is_honoured(client: openai.OpenAI, server: SluiceProcess) -> None:
    token = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": " Paris"})
    (paris,) = token.json()["tokens"]
    response = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0,
        logit_bias={str(paris): 100},
    )
    assert response.choices[0].text == " Paris" * 4


def test_prompt_as_token_ids(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=2)
    assert response.usage is not None and response.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    assert "vocabulary" in str(refused.value)


def test_tokenize_counts_what_generation_counts(
    client: openai.OpenAI, server: SluiceProcess
) -> None:
    counted = httpx.post(
        f"{server.url}/tokenize", json={"model": MODEL, "messages": CAPITAL}
    ).json()["count"]
    usage = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1).usage  # type: ignore[arg-type]
    assert usage is not None and usage.prompt_tokens == counted
