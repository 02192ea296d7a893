"""The synthetic load-testing engine behind the real app: vLLM's real front end over the
timer-driven core (no scripted fake involved)."""

from __future__ import annotations

import asyncio
import time

from fastapi.testclient import TestClient

from sluice.app import create_app
from sluice.config import Settings
from sluice.engine.synthetic import FILLER_TEXT, SyntheticEngine
from tests.api.conftest import wait_ready
from tests.api.sse import sse_json
from tests.fake_engine import MODEL_FOLDER

WORDS = FILLER_TEXT.split()


def synthetic_settings(vllm: dict[str, object] | None = None, **engine: object) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        model=str(MODEL_FOLDER),  # the synthetic engine uses its tokenizer and config
        engine={"kind": "synthetic", **engine},
        vllm=vllm or {},
    )


def test_synthetic_engine_serves_openai_shapes_at_its_rate() -> None:
    app = create_app(synthetic_settings(synthetic_tokens_per_s=200))
    with TestClient(app) as client:
        wait_ready(client)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["synthetic"]
        started = time.monotonic()
        body = client.post(
            "/v1/chat/completions",
            json={
                "model": "synthetic",
                "messages": [{"role": "user", "content": "a b c"}],
                "max_tokens": 20,
                "n": 2,
                "temperature": 0.5,
            },
        ).json()
        elapsed = time.monotonic() - started
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 40
    assert set(body["choices"][0]["message"]["content"].split()) <= set(WORDS)
    assert elapsed >= 20 / 200  # 20 tokens at 200 tokens/s per sequence


def test_synthetic_stream_honours_stop_and_reports_usage() -> None:
    app = create_app(synthetic_settings(synthetic_tokens_per_s=1000))
    with TestClient(app) as client:
        wait_ready(client)
        response = client.post(
            "/v1/completions",
            json={
                "model": "synthetic",
                "prompt": "x",
                "max_tokens": 50,
                "stop": [" five"],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    chunks = sse_json(response.text)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert " five" not in text
    assert set(text.split()) <= set(WORDS)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] <= 10


def test_synthetic_echo_with_logprobs_covers_the_prompt() -> None:
    """Prompt logprobs (completions' `echo` with `logprobs`, vLLM's `prompt_logprobs`): one
    entry per prompt token, the first null, as OpenAI and vLLM answer (it was a 500)."""
    app = create_app(synthetic_settings(synthetic_tokens_per_s=1000))
    with TestClient(app) as client:
        wait_ready(client)
        prompt = "one two three four"
        count = client.post("/tokenize", json={"model": "synthetic", "prompt": prompt})
        tokens = count.json()["count"]
        for stream in (False, True):
            response = client.post(
                "/v1/completions",
                json={
                    "model": "synthetic",
                    "prompt": prompt,
                    "max_tokens": 3,
                    "echo": True,
                    "logprobs": 2,
                    "stream": stream,
                },
            )
            assert response.status_code == 200, response.text
            if stream:
                first = sse_json(response.text)[0]["choices"][0]
            else:
                first = response.json()["choices"][0]
            assert first["text"].startswith(prompt)
            logprobs = first["logprobs"]["token_logprobs"]
            assert logprobs[0] is None
            assert len(logprobs) >= tokens
            assert all(isinstance(x, float) for x in logprobs[1:tokens])
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "synthetic",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 2,
                "prompt_logprobs": 1,
            },
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["prompt_logprobs"][0] is None


async def _engine(tokens_per_s: float, max_num_seqs: int | None = None) -> SyntheticEngine:
    from sluice.engine.args import engine_namespace

    cli = ["--max-num-seqs", str(max_num_seqs)] if max_num_seqs else []
    args = engine_namespace(str(MODEL_FOLDER), cli_args=cli)
    engine = SyntheticEngine(args, tokens_per_s)
    await engine.start()
    return engine


def _params(max_tokens: int) -> object:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)


async def test_synthetic_engine_queues_beyond_max_num_seqs_and_aborts() -> None:
    engine = await _engine(100, max_num_seqs=1)
    prompt = {"type": "token", "prompt_token_ids": [1, 2]}
    first = engine.client.generate(prompt, _params(1000), "a")
    second = engine.client.generate(prompt, _params(1000), "b")
    await anext(first)
    waiting = asyncio.ensure_future(anext(second))
    await asyncio.sleep(0.1)
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)
    await first.aclose()  # what a client that goes away does: vLLM aborts the request
    assert (await asyncio.wait_for(waiting, 5)).outputs[0].token_ids  # "b" got the slot
    await asyncio.sleep(0.05)
    assert (engine.stats().running, engine.stats().waiting) == (1, 0)
    await second.aclose()
    await asyncio.sleep(0.05)
    assert engine.client.get_num_unfinished_requests() == 0
    await engine.shutdown()


async def test_a_consumer_that_lags_gets_the_tokens_made_meanwhile_in_one_output() -> None:
    engine = await _engine(1000)
    stream = engine.client.generate({"type": "token", "prompt_token_ids": [1]}, _params(300), "a")
    first = await anext(stream)
    await asyncio.sleep(0.1)  # about 100 tokens are made meanwhile
    merged = await anext(stream)
    rest = [output async for output in stream]
    assert len(first.outputs[0].token_ids) == 1
    assert 30 <= len(merged.outputs[0].token_ids) <= 200
    outputs = [first, merged, *rest]
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == 300
    assert outputs[-1].outputs[0].finish_reason == "length"
    text = "".join(o.outputs[0].text for o in outputs)
    assert set(text.split()) <= set(WORDS)
    await engine.shutdown()
