"""The synthetic load-testing engine behind the real app (no fake engine involved)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from sluice.app import create_app
from sluice.config import Settings
from tests.api.conftest import wait_ready
from tests.api.sse import sse_json


def synthetic_settings(**engine: object) -> Settings:
    return Settings(_env_file=None, engine={"kind": "synthetic", **engine})  # type: ignore[call-arg]


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
    assert body["choices"][0]["message"]["content"].startswith(" lorem ipsum")
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
                "stop": ["amet"],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    chunks = sse_json(response.text)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == " lorem ipsum dolor sit "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_synthetic_engine_queues_beyond_max_num_seqs_and_aborts() -> None:
    import asyncio

    from sluice.engine.protocol import GenerationRequest, SamplingOptions
    from sluice.engine.synthetic import SyntheticEngine

    engine = SyntheticEngine(synthetic_settings(max_num_seqs=1, synthetic_tokens_per_s=100))
    await engine.start()
    sampling = SamplingOptions(max_tokens=1000)
    first = engine.generate(GenerationRequest("a", (1,), sampling))
    second = engine.generate(GenerationRequest("b", (1,), sampling))
    await anext(first)
    waiting = asyncio.ensure_future(anext(second))
    await asyncio.sleep(0.05)
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)
    # What the job runner does when its client goes away: abort, then close the stream.
    await engine.abort("a")
    await first.aclose()
    assert (await asyncio.wait_for(waiting, 5)).text == " lorem"  # "b" got the slot
    assert (engine.stats().running, engine.stats().waiting) == (1, 0)
    await second.aclose()
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)


async def test_a_consumer_that_lags_gets_the_tokens_made_meanwhile_in_one_delta() -> None:
    import asyncio

    from sluice.engine.protocol import GenerationRequest, SamplingOptions
    from sluice.engine.synthetic import SyntheticEngine

    engine = SyntheticEngine(synthetic_settings(synthetic_tokens_per_s=1000))
    await engine.start()
    stream = engine.generate(GenerationRequest("a", (1,), SamplingOptions(max_tokens=300)))
    first = await anext(stream)
    await asyncio.sleep(0.1)  # about 100 tokens are made meanwhile
    merged = await anext(stream)
    rest = [delta async for delta in stream]
    assert first.token_count == 1
    assert 50 <= merged.token_count <= 200
    assert len(merged.text.split()) == merged.token_count
    deltas = [first, merged, *rest]
    assert sum(d.token_count for d in deltas) == 300
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    words = "".join(d.text for d in deltas).split()
    assert words[:9] == [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
        "lorem",
    ]
