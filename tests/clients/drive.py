"""Drive one client library against a running sluice, the way its documentation says to use
an OpenAI-compatible server, and print one JSON line per case: `{"case", "ok", "detail"}`.

Runs in the clients' own virtualenv (.venv-clients, tests/clients/requirements.txt), not in
sluice's: tests/e2e/test_clients.py starts it as a subprocess against the shared server.

    python tests/clients/drive.py --base http://127.0.0.1:8000/v1 --model M --library litellm

Each case asserts what the library hands its user (text, a parsed object, a tool call), so
a refused request, a shape the library cannot read or a broken stream fails it. The model is
small: structured answers come from structured outputs (`json_schema`, a named tool), which
vLLM enforces, not from the model's judgement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Traffic goes to 127.0.0.1 only: LiteLLM would fetch its model price map from GitHub, and
# libraries that count tokens would fetch tokenizer files.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
KEY = "sk-unused"  # the shared test server has no keys; libraries want one anyway
QUESTION = "What is the capital of France? Answer in one word."
TOOL_QUESTION = "What is the weather in Paris?"
MAX_TOKENS = 16
TOOL_MAX_TOKENS = 64  # a whole `<tool_call>{...}</tool_call>` of the default model's format


class City(BaseModel):
    city: str


# `strict`: vLLM pins a strict tool's arguments to its schema (as OpenAI's structured
# outputs do); a non-strict one only gets the call's envelope, and this model's arguments
# are its own guess.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


def text(value: Any) -> str:
    assert isinstance(value, str) and value.strip(), f"no text: {value!r}"
    return value


def city(value: Any) -> str:
    assert isinstance(value, City) and value.city, f"not a City: {value!r}"
    return value.city


Case = Callable[[str, str], Any]
CASES: dict[str, dict[str, Case]] = {}


def case(library: str, name: str) -> Callable[[Case], Case]:
    def register(function: Case) -> Case:
        CASES.setdefault(library, {})[name] = function
        return function

    return register


# -- langchain-openai ------------------------------------------------------------------------
def _chat_openai(base: str, model: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    options: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return ChatOpenAI(model=model, base_url=base, api_key=KEY, max_retries=0, **options)


@case("langchain", "invoke")
def _(base: str, model: str) -> Any:
    return text(_chat_openai(base, model).invoke(QUESTION).content)


@case("langchain", "stream")
def _(base: str, model: str) -> Any:
    return text("".join(str(c.content) for c in _chat_openai(base, model).stream(QUESTION)))


@case("langchain", "with_structured_output(json_schema)")
def _(base: str, model: str) -> Any:
    chat = _chat_openai(base, model, max_tokens=TOOL_MAX_TOKENS)
    structured = chat.with_structured_output(City, method="json_schema")
    return city(structured.invoke("Name the capital of France."))


@case("langchain", "bind_tools(tool_choice=named)")
def _(base: str, model: str) -> Any:
    chat = _chat_openai(base, model, max_tokens=TOOL_MAX_TOKENS)
    bound = chat.bind_tools([get_weather], tool_choice="get_weather", strict=True)
    reply = bound.invoke(TOOL_QUESTION)
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"], reply
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str), reply
    return reply.tool_calls


@case("langchain", "use_responses_api")
def _(base: str, model: str) -> Any:
    return text(_chat_openai(base, model, use_responses_api=True).invoke(QUESTION).text)


@case("langchain", "OpenAI (completions)")
def _(base: str, model: str) -> Any:
    from langchain_openai import OpenAI

    llm = OpenAI(
        model=model, base_url=base, api_key=KEY, max_tokens=MAX_TOKENS, temperature=0,
        max_retries=0,
    )  # fmt: skip
    return text(llm.invoke("Once upon a time"))


# -- instructor ------------------------------------------------------------------------------
def _instructor(base: str, mode: str) -> Any:
    import instructor
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=KEY, max_retries=0)
    return instructor.from_openai(client, mode=getattr(instructor.Mode, mode))


# JSON_SCHEMA is enforced (structured outputs). instructor's TOOLS modes send a non-strict
# tool (no `strict`, even TOOLS_STRICT in 1.17): the call comes back, but its arguments are
# this model's guess.
INSTRUCTOR_REQUEST: dict[str, Any] = {
    "response_model": City,
    "max_retries": 0,
    "max_tokens": TOOL_MAX_TOKENS,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Name the capital of France."}],
}


@case("instructor", "mode=JSON_SCHEMA")
def _(base: str, model: str) -> Any:
    completions = _instructor(base, "JSON_SCHEMA").chat.completions
    return city(completions.create(model=model, **INSTRUCTOR_REQUEST))


@case("instructor", "create_partial (streamed, JSON_SCHEMA)")
def _(base: str, model: str) -> Any:
    completions = _instructor(base, "JSON_SCHEMA").chat.completions
    *_, last = completions.create_partial(model=model, **INSTRUCTOR_REQUEST)
    assert isinstance(last.city, str) and last.city, last
    return last.city


# -- pydantic-ai -----------------------------------------------------------------------------
def _agent(base: str, model: str, kind: str, **kwargs: Any) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=base, api_key=KEY)
    chosen = OpenAIChatModel if kind == "chat" else OpenAIResponsesModel
    settings = {"max_tokens": MAX_TOKENS, "temperature": 0}
    return Agent(chosen(model, provider=provider), model_settings=settings, **kwargs)


@case("pydantic-ai", "chat")
def _(base: str, model: str) -> Any:
    return text(_agent(base, model, "chat").run_sync(QUESTION).output)


@case("pydantic-ai", "responses")
def _(base: str, model: str) -> Any:
    return text(_agent(base, model, "responses").run_sync(QUESTION).output)


@case("pydantic-ai", "chat stream_text")
def _(base: str, model: str) -> Any:
    async def streamed() -> str:
        async with _agent(base, model, "chat").run_stream(QUESTION) as run:
            return "".join([delta async for delta in run.stream_text(delta=True)])

    return text(asyncio.run(streamed()))


@case("pydantic-ai", "NativeOutput(City)")
def _(base: str, model: str) -> Any:
    from pydantic_ai import NativeOutput

    agent = _agent(base, model, "chat", output_type=NativeOutput(City), retries=0)
    return city(agent.run_sync("Name the capital of France.").output)


# -- litellm (as a client) -------------------------------------------------------------------
def _litellm(base: str, model: str) -> tuple[Any, dict[str, Any]]:
    import litellm

    litellm.suppress_debug_info = True
    options = {"api_base": base, "api_key": KEY, "max_tokens": MAX_TOKENS, "temperature": 0}
    return litellm, {"model": f"openai/{model}", **options}


@case("litellm", "completion")
def _(base: str, model: str) -> Any:
    litellm, options = _litellm(base, model)
    reply = litellm.completion(messages=[{"role": "user", "content": QUESTION}], **options)
    assert reply.usage.completion_tokens > 0, reply
    return text(reply.choices[0].message.content)


@case("litellm", "completion(stream, include_usage)")
def _(base: str, model: str) -> Any:
    litellm, options = _litellm(base, model)
    chunks = list(
        litellm.completion(
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    return text("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


@case("litellm", "completion(tools, tool_choice=named)")
def _(base: str, model: str) -> Any:
    litellm, options = _litellm(base, model)
    reply = litellm.completion(
        messages=[{"role": "user", "content": TOOL_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **{**options, "max_tokens": TOOL_MAX_TOKENS},
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", reply
    assert "city" in json.loads(calls[0].function.arguments), calls
    return calls[0].function.arguments


@case("litellm", "text_completion")
def _(base: str, model: str) -> Any:
    litellm, options = _litellm(base, model)
    return text(litellm.text_completion(prompt="Once upon a time", **options).choices[0].text)


# -- llama-index -----------------------------------------------------------------------------
def _llama(base: str, model: str) -> Any:
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(
        model=model, api_base=base, api_key=KEY, is_chat_model=True, max_tokens=MAX_TOKENS,
        temperature=0, context_window=2048, max_retries=0,
    )  # fmt: skip


@case("llama-index", "chat")
def _(base: str, model: str) -> Any:
    from llama_index.core.llms import ChatMessage

    return text(str(_llama(base, model).chat([ChatMessage(role="user", content=QUESTION)])))


@case("llama-index", "stream_chat")
def _(base: str, model: str) -> Any:
    from llama_index.core.llms import ChatMessage

    deltas = _llama(base, model).stream_chat([ChatMessage(role="user", content=QUESTION)])
    return text("".join(reply.delta or "" for reply in deltas))


@case("llama-index", "complete")
def _(base: str, model: str) -> Any:
    return text(_llama(base, model).complete(QUESTION).text)


# -- llm (the CLI) ---------------------------------------------------------------------------
def _llm_cli(base: str, model: str, *args: str) -> str:
    """`llm` with sluice registered in `extra-openai-models.yaml` (its documented way)."""
    with tempfile.TemporaryDirectory() as home:
        Path(home, "extra-openai-models.yaml").write_text(
            f"- model_id: sluice\n  model_name: {model}\n  api_base: {base}\n"
        )
        env = {**os.environ, "LLM_USER_PATH": home, "OPENAI_API_KEY": KEY}
        command = [str(Path(sys.executable).with_name("llm")), "-m", "sluice", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout


@case("llm", "prompt (streamed)")
def _(base: str, model: str) -> Any:
    return text(_llm_cli(base, model, "-o", "max_tokens", str(MAX_TOKENS), QUESTION))


@case("llm", "prompt --no-stream")
def _(base: str, model: str) -> Any:
    return text(_llm_cli(base, model, "--no-stream", "-o", "max_tokens", str(MAX_TOKENS), QUESTION))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the server's /v1 URL")
    parser.add_argument("--model", required=True)
    parser.add_argument("--library", required=True, choices=sorted(CASES))
    args = parser.parse_args()
    failed = 0
    for name, run in CASES[args.library].items():
        try:
            detail = repr(run(args.base, args.model))[:300]
            ok = True
        except Exception as exc:  # the case's failure, reported with its cause chain
            ok = False
            failed += 1
            detail = "".join(traceback.format_exception(exc))[-3000:]
        print(json.dumps({"case": name, "ok": ok, "detail": detail}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
