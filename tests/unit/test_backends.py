"""Upstream backends on the attempt loop's level: retries, budget, fallbacks, breakers,
timeouts and refusals against real local HTTP servers (aiohttp's, scripted per test), then
the registry's checks, the router and the cascade's signals. tests/e2e/test_upstreams.py
runs the whole path against real sluice processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import settings as settings_of_hypothesis
from hypothesis import strategies as st
from opentelemetry import trace
from starlette.responses import Response

from sluice.api.generation import Generation, UpstreamShape
from sluice.api.middleware import response_headers
from sluice.api.sse import ClientDisconnected
from sluice.backends import proxy
from sluice.backends.proxy import (
    MEDIA_PART_TOKENS,
    RETRY_BUDGET_FLOOR,
    Answer,
    LocalHandoff,
    RetryBudget,
    UpstreamCall,
    UpstreamRateLimited,
    estimate_prompt_tokens,
    usage_of,
)
from sluice.backends.registry import Backends, BackendsError
from sluice.backends.router import as_stream, escalation, needed_tags
from sluice.config import CascadeSettings, Settings
from sluice.errors import (
    InvalidRequest,
    RateLimitExceeded,
    RequestTimedOut,
    ServiceUnavailable,
    SluiceError,
    StoreUnavailable,
    UpstreamError,
    error_response,
)
from sluice.gateway.admission import Overloaded
from sluice.gateway.auth import Principal
from sluice.gateway.keys import KeyPolicy
from sluice.lifecycle import Lifecycle

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OK_BODY = {
    "id": "x",
    "object": "chat.completion",
    "model": "up",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


async def ok(request: web.Request) -> web.StreamResponse:
    return web.json_response(OK_BODY)


class Servers:
    """Two local HTTP servers standing in for upstreams `x` and `y`; each answers with the
    handler the test put in `handlers`."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.urls: dict[str, str] = {}
        self.registries: list[Backends] = []  # closed at the end (their sessions)
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        for name in ("x", "y"):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._dispatch(name))
            # a handler still running at the end (a hung upstream) is cancelled at once
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.urls[name] = f"http://127.0.0.1:{port}/v1"
            self._runners.append(runner)

    def _dispatch(self, name: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handlers.get(name, ok)(request)

        return handle

    async def stop(self) -> None:
        for registry in self.registries:
            await registry.close()
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    running = Servers()
    await running.start()
    yield running
    await running.stop()


def settings(urls: dict[str, str] | None = None, **routing: Any) -> Settings:
    urls = urls or {"x": "http://127.0.0.1:9/v1", "y": "http://127.0.0.1:9/v1"}
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        backends=[
            {"name": "x", "base_url": urls["x"], "models": {"m": "up", "n": "up"}},
            {"name": "y", "base_url": urls["y"], "models": {"m": "up", "fb": "up"}},
        ],
        routing={"fallbacks": {"m": ["fb"]}, "retry_backoff_s": 0, **routing},
    )


def backends_with(
    servers: Servers | None, handlers: dict[str, Handler], **routing: Any
) -> Backends:
    """A registry over `servers` (answering with `handlers`), or over nothing (no requests)."""
    backends = Backends(settings(servers.urls if servers else None, **routing), ["local"])
    if servers is not None:
        servers.handlers = handlers
        servers.registries.append(backends)
    return backends


class Attempts:
    """Records `Metrics.upstream_attempt` calls: (backend, attempt, outcome)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def upstream_attempt(self, backend: str, model: str, attempt: int, outcome: str) -> None:
        self.seen.append((backend, attempt, outcome))


def call(
    backends: Backends,
    chain: tuple[str, ...] = ("m", "fb"),
    attempts: Attempts | None = None,
    **body: Any,
) -> UpstreamCall:
    return UpstreamCall(
        body={"model": chain[0], "messages": [{"role": "user", "content": "hi"}], **body},
        operation="chat",
        chain=chain,
        requested=chain[0],
        principal=Principal("anonymous"),
        settings=Settings(_env_file=None, routing=backends.routing.model_dump()),  # type: ignore[call-arg]
        backends=backends,
        gateway=None,  # type: ignore[arg-type]  # open() does not reserve
        lifecycle=Lifecycle(),
        budget=RetryBudget(0.2),
        metrics=attempts,  # type: ignore[arg-type]  # only upstream_attempt is called
        record=None,
        tracer=trace.NoOpTracer(),
        request_id="r",
        max_tokens=16,
        response_headers={},
        static_model=chain[0],
    )


def failing(status: int, times: int) -> Handler:
    """Answer `status` the first `times` requests, then 200."""
    calls = {"n": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        calls["n"] += 1
        if calls["n"] <= times:
            return web.json_response({"error": {"message": f"boom {status}"}}, status=status)
        return web.json_response(OK_BODY)

    return handler


async def test_a_failed_attempt_is_retried_and_the_answer_says_which(servers: Servers) -> None:
    backends = backends_with(servers, {"x": failing(503, 1)})
    backends.by_model["m"] = [backends.upstreams[0]]  # the retry goes back to x
    upstream_call = call(backends)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    assert (answer.model, answer.attempt) == ("m", 2)
    assert upstream_call.response_headers["x-sluice-attempt"] == "2"


async def test_when_a_models_retries_are_spent_its_fallback_answers(servers: Servers) -> None:
    backends = backends_with(servers, {"x": failing(500, 99)}, retries=1)
    backends.upstreams[1].settings.models.pop("m")  # only x serves m now
    backends.by_model["m"] = [backends.upstreams[0]]
    answer = await call(backends).open()
    assert isinstance(answer, Answer)
    assert (answer.model, answer.upstream.name, answer.attempt) == ("fb", "y", 3)


async def test_the_retry_budget_caps_retries_across_requests() -> None:
    budget = RetryBudget(0.0)
    budget.request()
    assert [budget.try_retry() for _ in range(RETRY_BUDGET_FLOOR + 1)] == [True] * (
        RETRY_BUDGET_FLOOR
    ) + [False]
    generous = RetryBudget(0.5)
    for _ in range(10):
        generous.request()
    assert sum(generous.try_retry() for _ in range(20)) == 5 + RETRY_BUDGET_FLOOR


async def test_with_the_budget_spent_a_failure_goes_straight_to_the_fallback(
    servers: Servers,
) -> None:
    backends = backends_with(servers, {"x": failing(500, 99)})
    backends.by_model["m"] = [backends.upstreams[0]]  # m on x only; y serves fb
    upstream_call = call(backends)
    upstream_call.budget = RetryBudget(0.0)
    for _ in range(RETRY_BUDGET_FLOOR):
        assert upstream_call.budget.try_retry()
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    assert (answer.model, answer.attempt) == ("fb", 2)  # m once, no retry, then fb


async def test_a_refusal_is_the_clients_error_and_is_not_retried(servers: Servers) -> None:
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        error = {"message": "bad temperature", "param": "temperature"}
        return web.json_response({"error": error}, status=422)

    backends = backends_with(servers, {"x": refuse, "y": refuse})
    with pytest.raises(InvalidRequest) as raised:
        await call(backends).open()
    assert (raised.value.message, raised.value.param) == ("bad temperature", "temperature")
    assert len(seen) == 1
    assert all(u.state == "closed" and u.breaker.failure_count == 0 for u in backends.upstreams)


async def test_an_error_body_under_a_200_is_judged_as_its_error(servers: Servers) -> None:
    """Some servers answer errors with status 200: a body with `error` and no answer in it
    is a failure (fails over) or, with a 4xx `code`, the client's error; not a success."""

    async def failed(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "engine died"}})

    async def refused(request: web.Request) -> web.StreamResponse:
        error = {"message": "bad top_p", "code": 400, "param": "top_p"}
        return web.json_response({"error": error})

    backends = backends_with(servers, {"x": failed, "y": ok})
    answer = await call(backends, chain=("m",)).open()
    assert isinstance(answer, Answer) and answer.upstream.name == "y"
    with pytest.raises(InvalidRequest) as raised:
        await call(backends_with(servers, {"x": refused, "y": refused})).open()
    assert (raised.value.message, raised.value.param) == ("bad top_p", "top_p")


@pytest.mark.parametrize("status", [401, 403, 404, 409, 408])
async def test_an_upstream_refusing_sluice_itself_fails_over(servers: Servers, status: int) -> None:
    """401/403 (sluice's credentials), 404 (its mapping or route), 409 and 408 are the
    upstream's trouble, not the body's: the sibling upstream answers; when none can, a 502
    (a 504 `upstream_timeout` for 408), and the failures count for the breaker."""

    async def deny(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "not here"}}, status=status)

    backends = backends_with(servers, {"x": deny, "y": ok})
    answer = await call(backends, chain=("m",)).open()
    assert isinstance(answer, Answer) and answer.upstream.name == "y"

    backends = backends_with(servers, {"x": deny, "y": deny})
    with pytest.raises(UpstreamError) as raised:
        await call(backends).open()
    assert raised.value.status == (504 if status == 408 else None)  # None: the table's 502
    assert "not here" in raised.value.message
    assert sum(u.breaker.failure_count for u in backends.upstreams) >= 2


async def test_failures_open_the_breaker_then_a_single_probe_closes_it(
    servers: Servers,
) -> None:
    backends = backends_with(
        servers,
        {"x": failing(500, 2), "y": failing(500, 99)},
        breaker_failures=2,
        breaker_recovery_s=1,
        retries=0,
    )
    x = backends.upstreams[0]
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await call(backends, chain=("n",)).open()
    assert x.state == "open" and not x.available()
    with pytest.raises(ServiceUnavailable):  # nothing can take `n` now: no attempt made
        await call(backends, chain=("n",)).open()
    await asyncio.sleep(1.05)
    assert x.state == "half_open" and x.available()
    probe = x.begin()
    assert probe and not x.available()  # one probe at a time
    x.end(probe)
    answer = await call(backends, chain=("n",)).open()
    assert isinstance(answer, Answer)
    assert x.state == "closed"


async def test_an_upstream_that_does_not_start_streaming_in_time_times_out(
    servers: Servers,
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response(OK_BODY)

    backends = backends_with(servers, {"x": slow, "y": slow}, retries=0)
    for upstream in backends.upstreams:
        upstream.settings.timeouts.first_token_s = 0.1
        upstream.settings.timeouts.connect_s = 0.1
    started = time.monotonic()
    with pytest.raises(UpstreamError) as raised:
        await call(backends, stream=True).open()
    assert time.monotonic() - started < 2
    assert raised.value.status == 504


async def test_an_upstream_429_after_every_try_is_the_clients_429(servers: Servers) -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": "slow down"}}
        return web.json_response(error, status=429, headers={"retry-after": "7"})

    with pytest.raises(RateLimitExceeded) as raised:
        await call(backends_with(servers, {"x": limited, "y": limited}, retries=0)).open()
    assert raised.value.retry_after_s == 7


async def test_the_chain_hands_an_engine_model_back(servers: Servers) -> None:
    backends = backends_with(servers, {"x": failing(500, 99), "y": failing(500, 99)}, retries=0)
    with pytest.raises(LocalHandoff) as handoff:
        await call(backends, chain=("n", "local")).open()
    assert handoff.value.index == 1


def test_the_registry_refuses_names_nothing_serves_and_overlaps() -> None:
    with pytest.raises(ValueError, match="nothing serves"):
        Backends(settings(fallbacks={"m": ["nope"]}), ["local"])
    with pytest.raises(ValueError, match="served by the engine and by an upstream"):
        Backends(settings(), ["m"])
    with pytest.raises(ValueError, match="alias with a served model's name"):
        Backends(settings(aliases={"local": "m"}), ["local"])


def test_least_outstanding_picks_the_idler_available_upstream() -> None:
    backends = backends_with(None, {})
    x, y = backends.by_model["m"]
    assert {backends.pick("m") for _ in range(200)} == {x, y}  # a tie: either, at random
    x.begin()
    assert backends.pick("m") is y
    y.begin()
    y.begin()
    assert backends.pick("m") is x
    assert backends.pick("m", tried=[x]) is y  # a retry tries another upstream first
    x.healthy = False
    assert backends.pick("m") is y
    assert backends.pick("m", tried=[y]) is y  # ... or the same one, if it is the only one


async def test_a_retry_goes_to_another_upstream(servers: Servers) -> None:
    """An upstream that failed is not the retry's pick while another one serves the model
    (helper audit: with both idle, the retry went back to the failed one)."""
    backends = backends_with(servers, {"x": failing(502, 99), "y": ok})
    for _ in range(10):
        upstream_call = call(backends, chain=("m",))  # no fallback: only a retry can rescue
        answer = await upstream_call.open()
        assert isinstance(answer, Answer) and answer.upstream.name == "y"
        await upstream_call.close()


def test_prompt_estimate_and_usage_shapes() -> None:
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": "a" * 400}]}) > 100
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    # an image counts as one image, not as its data URL's megabyte of base64
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10**6}}
    with_image = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
    }
    assert MEDIA_PART_TOKENS <= estimate_prompt_tokens(with_image) < MEDIA_PART_TOKENS + 50
    part = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 10**6}
    responses = {"input": [{"role": "user", "content": [part]}]}
    assert MEDIA_PART_TOKENS <= estimate_prompt_tokens(responses) < MEDIA_PART_TOKENS + 50
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}) == (3, 2)
    assert usage_of({"response": {"usage": {"input_tokens": 5, "output_tokens": 4}}}) == (5, 4)
    assert usage_of({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == (7, 0)  # embeddings
    assert usage_of({"usage": None}) is None


def test_tags_a_request_needs() -> None:
    body = {
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_schema"},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    assert needed_tags(body) == {"tools", "json_schema", "vision"}
    assert needed_tags({"messages": [{"role": "user", "content": "x"}]}) == set()


def test_the_router_picks_the_cheapest_that_fits_and_explains_a_miss() -> None:
    base = settings()
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        backends=[
            {
                "name": "x",
                "base_url": "http://x.invalid/v1",
                "models": ["small", "big"],
                "pricing": {
                    "small": {"output_usd_per_mtok": 1},
                    "big": {"output_usd_per_mtok": 10},
                },
            }
        ],
        routing={
            "models": {"small": {"context_length": 1000}, "big": {"tags": ["vision"]}},
            "routes": {"auto": {"models": ["big", "small"], "max_ttft_s": 1}},
        },
    )
    assert base.routing.routes == {}
    backends = Backends(config, [])
    route = config.routing.routes["auto"]
    assert backends.router.choose("auto", route, 100, 100, set()) == ("small", "big")
    assert backends.router.choose("auto", route, 900, 200, set()) == ("big",)
    for _ in range(3):
        backends.latency.observe("big", 2.0)
    with pytest.raises(InvalidRequest) as raised:
        backends.router.choose("auto", route, 900, 200, set())
    assert "context length" in raised.value.message and "latency" in raised.value.message
    assert raised.value.code == "no_model_fits"
    with pytest.raises(InvalidRequest, match="capabilities"):
        backends.router.choose("auto", route, 10, 10, {"tools"})


def answer(content: str, finish: str = "stop", logprobs: list[float] | None = None) -> Any:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": finish,
        "logprobs": None,
    }
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": v} for v in logprobs]}
    return {"id": "a", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}


def test_cascade_signals() -> None:
    every = CascadeSettings(
        models=["a", "b"], escalate_on=["length", "schema", "logprob"], min_mean_logprob=-1
    )
    plain: dict[str, Any] = {}
    schema = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object", "required": ["x"]}},
        }
    }
    assert escalation(every, plain, answer("fine")) is None
    assert escalation(every, plain, answer("cut", finish="length")) == "length"
    assert escalation(every, schema, answer('{"x": 1}')) is None
    assert escalation(every, schema, answer('{"y": 1}')) == "schema"
    assert escalation(every, {"response_format": {"type": "json_object"}}, answer("no")) == (
        "schema"
    )
    assert escalation(every, plain, answer("unsure", logprobs=[-0.5, -3.0])) == "logprob"
    assert escalation(every, plain, answer("sure", logprobs=[-0.1, -0.2])) is None


def test_a_whole_answer_as_a_stream() -> None:
    body = {**answer("hello"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    frames = [f.removeprefix("data: ") for f in as_stream(body, True).split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    first, usage = json.loads(frames[0]), json.loads(frames[1])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "hello"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 1
    assert len(as_stream(body, False).split("\n\n")) == 3  # the chunk, [DONE], ""


async def test_a_stream_cut_after_its_first_event_is_an_error_not_a_retry(
    servers: Servers,
) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    sent: list[int] = []

    async def cut(request: web.Request) -> web.StreamResponse:
        sent.append(1)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(2):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()  # the upstream dies mid-stream
        return response

    backends = backends_with(servers, {"x": cut, "y": cut})
    attempts = Attempts()
    upstream_call = call(backends, attempts=attempts, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer) and answer.attempt == 1
    frames: list[str] = []

    async def relay() -> None:
        async for frame in upstream_call.frames(answer):
            frames.append(frame)

    with pytest.raises(UpstreamError) as raised:
        await relay()
    assert len(frames) == 2 and sent == [1]  # relayed, then the error: never sent again
    assert isinstance(upstream_call.error, UpstreamError)
    assert answer.upstream.breaker.failure_count == 1
    await upstream_call.close(raised.value)
    assert [outcome for _, _, outcome in attempts.seen] == ["stream_cut"]  # counted once


async def streaming(request: web.Request) -> web.StreamResponse:
    """A whole stream: one content event, the usage event and [DONE]."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    for event in (chunk, usage):
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [
        (None, "ok"),
        (ClientDisconnected(), "client_closed"),
        (ConnectionResetError("sending the answer failed"), "client_closed"),
        (RequestTimedOut("past the time limit"), "error"),
    ],
)
async def test_each_attempt_counts_one_outcome_and_a_client_leaving_is_not_the_upstreams(
    servers: Servers, ending: BaseException | None, outcome: str
) -> None:
    backends = backends_with(servers, {"x": streaming, "y": streaming})
    attempts = Attempts()
    upstream_call = call(backends, chain=("n",), attempts=attempts, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    async for _ in upstream_call.frames(answer):
        pass
    await upstream_call.close(ending)
    await upstream_call.close(ending)  # once
    assert attempts.seen == [("x", 1, outcome)]


def test_an_upstream_at_its_concurrency_cap_is_skipped() -> None:
    backends = backends_with(None, {})
    x, y = backends.by_model["m"]
    x.settings.max_concurrent = 1
    y.settings.max_concurrent = 1
    x.begin()
    assert backends.pick("m") is y
    y.begin()
    assert backends.pick("m") is None


def test_a_missing_api_key_variable_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICE_TEST_UPSTREAM_KEY", raising=False)
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        backends=[
            {
                "name": "paid",
                "base_url": "https://api.example.com/v1",
                "api_key_env": "SLUICE_TEST_UPSTREAM_KEY",
                "models": ["m"],
            }
        ],
    )
    with pytest.raises(BackendsError, match="SLUICE_TEST_UPSTREAM_KEY"):
        Backends(config, [])
    monkeypatch.setenv("SLUICE_TEST_UPSTREAM_KEY", "sk-upstream")
    assert Backends(config, []).upstreams[0].headers == {"authorization": "Bearer sk-upstream"}


def test_the_body_goes_upstream_as_sluice_read_it() -> None:
    """`"stream": "false"` is a false stream for sluice's checks, so the upstream must get
    `false` too (and `"n": "3"` the 3 the reservation counted)."""
    raw = {"model": "m", "stream": "false", "n": "3", "prompt": ["a", "b"], "max_tokens": "7"}
    shape = UpstreamShape.model_validate(raw)
    body = shape.normalised(raw)
    assert (body["stream"], body["n"], body["max_tokens"]) == (False, 3, 7)
    assert shape.prompts("text_completion") == 2 and shape.prompts("chat") == 1
    assert "stream" not in shape.normalised({"model": "m"})
    assert UpstreamShape.model_validate({"model": "m", "logprobs": "false"}).logprobs is False


async def test_a_busy_capped_upstream_still_passes_its_health_check(servers: Servers) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": []})
        await asyncio.sleep(3)
        return web.json_response(OK_BODY)

    backends = backends_with(servers, {"x": slow})
    x = backends.upstreams[0]
    x.settings.max_concurrent = 1
    x.settings.timeouts.connect_s = 0.5
    busy = asyncio.ensure_future(call(backends, chain=("n",)).open())
    await asyncio.sleep(0.3)
    assert x.outstanding == 1 and not x.available()  # the cap holds ...
    assert await x.check_health()  # ... and the health check is not queued behind it
    busy.cancel()


async def test_the_error_is_the_last_real_failure_even_when_the_breaker_opened(
    servers: Servers,
) -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": "slow down"}}
        return web.json_response(error, status=429, headers={"retry-after": "3"})

    backends = backends_with(servers, {"x": limited}, breaker_failures=1, retries=1)
    with pytest.raises(RateLimitExceeded) as raised:  # the retry finds x's breaker open
        await call(backends, chain=("n",)).open()
    assert raised.value.retry_after_s == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_a_200_that_is_not_an_answer_is_a_failure_and_falls_back(
    servers: Servers, stream: bool
) -> None:
    async def portal(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>Bad Gateway</html>", content_type="text/html")

    backends = backends_with(servers, {"x": portal}, retries=0)
    backends.by_model["m"] = [backends.upstreams[0]]  # m on x only; y serves fb
    if stream:
        servers.handlers["y"] = sse_handler(['{"choices":[]}', "[DONE]"])
    answer = await call(backends, stream=stream).open()
    assert isinstance(answer, Answer) and answer.model == "fb"
    assert backends.upstreams[0].breaker.failure_count == 1


def sse_handler(datas: list[str], raw: bytes = b"") -> Handler:
    """A stream of `data:` events (then `raw` bytes as they are)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in datas:
            await response.write(f"data: {data}\n\n".encode())
        if raw:
            await response.write(raw)
        await response.write_eof()
        return response

    return handler


FIRST = '{"choices":[{"index":0,"delta":{"content":"a"}}]}'


@pytest.mark.parametrize(
    ("datas", "raw"),
    [
        ([FIRST, '{"usage": oops}', "[DONE]"], b""),  # invalid JSON
        ([FIRST, '["usage"]', "[DONE]"], b""),  # JSON, not an object
        ([FIRST], b"data: \xff\xfe\n\ndata: [DONE]\n\n"),  # not UTF-8
        ([FIRST, FIRST], b""),  # no [DONE]
    ],
    ids=["invalid-json", "not-an-object", "not-utf8", "no-done"],
)
async def test_a_stream_that_breaks_after_its_first_event_ends_in_an_upstream_error(
    servers: Servers, datas: list[str], raw: bytes
) -> None:
    backends = backends_with(servers, {"x": sse_handler(datas, raw)})
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)

    async def relay() -> list[str]:
        return [frame async for frame in upstream_call.frames(answer)]

    with pytest.raises(UpstreamError) as raised:
        await relay()
    assert raised.value.code == "upstream_error"
    assert upstream_call.error is raised.value
    assert answer.upstream.breaker.failure_count == 1


async def test_an_event_cut_before_its_blank_line_is_not_relayed(servers: Servers) -> None:
    """A connection cut mid-event (WHATWG: an incomplete event is not dispatched): a cut
    first event is a failed attempt (the fallback answers); a cut later one never reaches the
    client as a whole frame, the stream ends in the upstream error."""
    cut = b'data: {"choices":[{"index":0,"delta":{"content":"wor'
    backends = backends_with(servers, {"x": sse_raw(cut), "y": sse_handler([FIRST, "[DONE]"])})
    backends.by_model["m"] = [backends.upstreams[0]]
    answer = await call(backends, stream=True).open()
    assert isinstance(answer, Answer) and (answer.model, answer.upstream.name) == ("fb", "y")

    upstream_call, answer = await open_stream(servers, sse_raw(f"data: {FIRST}\n\n".encode(), cut))
    frames: list[str] = []

    async def collect() -> None:
        async for frame in upstream_call.frames(answer):
            frames.append(frame)

    with pytest.raises(UpstreamError):
        await collect()
    assert frames == [f"data: {FIRST}\n\n"]
    # a bare [DONE] needs no blank line: nothing in it can be cut
    upstream_call, answer = await open_stream(
        servers, sse_raw(f"data: {FIRST}\n\n".encode(), b"data: [DONE]\n")
    )
    assert await relayed(upstream_call, answer) == [f"data: {FIRST}\n\n", "data: [DONE]\n\n"]


@pytest.mark.parametrize("ends", [True, False], ids=["completed", "cut"])
async def test_a_responses_stream_ends_with_its_terminal_event(
    servers: Servers, ends: bool
) -> None:
    """The Responses API has no [DONE]: its stream is whole at `response.completed` (or
    `.failed`/`.incomplete`); one that ends before is cut (an error event, a failure)."""
    created = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    delta = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"response.completed"}\n\n'
    )
    usage = b'{"input_tokens":3,"output_tokens":1,"total_tokens":4}'
    completed = (
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"usage":' + usage + b"}}\n\n"
    )
    parts = (created, delta, completed) if ends else (created, delta)
    backends = backends_with(servers, {"x": sse_raw(*parts)})
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends, stream=True)
    upstream_call.operation = "generate_content"
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    if ends:
        frames = await relayed(upstream_call, answer)
        assert len(frames) == 3 and frames[-1].startswith("event: response.completed")
        assert answer.upstream.breaker.failure_count == 0
    else:
        with pytest.raises(UpstreamError):
            await relayed(upstream_call, answer)
        assert answer.upstream.breaker.failure_count == 1


async def test_a_line_longer_than_the_limit_breaks_the_stream(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "MAX_LINE_BYTES", 1024)
    backends = backends_with(servers, {"x": sse_handler([FIRST, "x" * 5000, "[DONE]"])})
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    with pytest.raises(UpstreamError):
        async for _ in upstream_call.frames(answer):
            pass


def test_tags_of_a_malformed_body_are_none() -> None:
    assert needed_tags({"messages": 5}) == set()
    assert needed_tags({"messages": [5, {"content": 7}]}) == set()


def test_fallbacks_a_key_may_not_use_are_skipped() -> None:
    policy = KeyPolicy(name="k", models=["m", "also"])
    generation = Generation(
        None,  # type: ignore[arg-type]
        Principal("k", policy),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        trace.NoOpTracer(),
        None,  # type: ignore[arg-type]
    )
    assert generation._allowed_fallbacks(("m", "fb", "also")) == ("m", "also")
    open_key = dataclasses.replace(generation, principal=Principal("anonymous"))
    assert open_key._allowed_fallbacks(("m", "fb")) == ("m", "fb")


def _generation(principal: Principal, settings: Settings | None = None) -> Generation:
    """A Generation for the checks that read only the key and the settings."""
    return Generation(
        None,  # type: ignore[arg-type]
        principal,
        settings or Settings(),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        trace.NoOpTracer(),
        None,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 2, "max_completion_tokens": 9}, "max_completion_tokens"),
        ({"max_tokens": 9, "max_completion_tokens": 2}, "max_tokens"),
        ({"max_tokens": 2, "n_predict": 9}, "n_predict"),  # llama.cpp reads it first
        ({"max_new_tokens": 9}, "max_new_tokens"),  # TGI's name
        ({"n_predict": -1}, "n_predict"),  # llama.cpp's "no limit": nothing to reserve
    ],
)
def test_every_output_cap_in_an_upstream_body_is_checked(extra: dict[str, Any], param: str) -> None:
    """Whatever name a body gives its output cap, OpenAI's or another server's, the largest
    is held to the key's cap (8 here), so no name passes a cap or the reservation."""
    generation = _generation(Principal("k", KeyPolicy(name="k", max_tokens=8)))
    for operation in ("chat", "text_completion"):
        body = {"model": "m", **extra}
        if operation == "text_completion":
            body.pop("max_completion_tokens", None)
            if param == "max_completion_tokens":
                continue
        with pytest.raises(InvalidRequest) as raised:
            generation._caps(body, operation)
        assert raised.value.param == param


def test_the_largest_output_cap_is_the_one_reserved() -> None:
    generation = _generation(Principal("k", KeyPolicy(name="k", max_tokens=8)))
    body = {"model": "m", "max_tokens": 2, "n_predict": 6, "max_new_tokens": 3}
    assert generation._caps(body, "chat")[1:] == ("n_predict", 6)
    assert generation._caps({"model": "m"}, "chat")[1:] == (None, 8)  # the key's cap
    assert generation._caps({"model": "m", "n_predict": 9}, "embeddings")[1:] == (None, 0)


def test_a_body_without_openais_output_cap_gets_it_at_what_is_reserved() -> None:
    """An upstream that does not know `n_predict` still stops at what was reserved; a body
    with no cap at all gets the key's."""
    generation = _generation(Principal("k", KeyPolicy(name="k", max_tokens=8)))
    _, body, reserved = generation.upstream_body({"model": "m", "n_predict": 5}, "chat")
    assert (body["n_predict"], body["max_completion_tokens"], reserved) == (5, 5, 5)
    _, body, reserved = generation.upstream_body({"model": "m", "prompt": "x"}, "text_completion")
    assert (body["max_tokens"], reserved) == (8, 8)
    _, body, _ = generation.upstream_body({"model": "m", "max_tokens": 3}, "chat")
    assert "max_completion_tokens" not in body and body["max_tokens"] == 3
    _, body, reserved = generation.upstream_body({"model": "m", "input": "x"}, "embeddings")
    assert reserved == 0 and "max_tokens" not in body
    # the client's own smaller cap is never raised to another name's larger one, which is
    # what is reserved (an upstream may honour either)
    mixed = {"model": "m", "max_tokens": 2, "n_predict": 6}
    for operation in ("chat", "text_completion"):
        _, body, reserved = generation.upstream_body(mixed, operation)
        assert (body["max_tokens"], body["n_predict"], reserved) == (2, 6, 6)
        assert "max_completion_tokens" not in body
    _, body, _ = generation.upstream_body({"model": "m", "max_tokens": None}, "chat")
    assert body["max_completion_tokens"] == 8  # a null cap is no cap


def test_cascade_signals_judge_only_what_they_can() -> None:
    """Choices that are not objects, a `json_schema` that is not an object and a schema that
    is not a valid one give no signal, never an error."""
    schema = CascadeSettings(models=["a", "b"], escalate_on=["schema"])
    assert escalation(schema, {}, {"choices": [5, "x"]}) is None
    loose = {"response_format": {"type": "json_schema", "json_schema": "not an object"}}
    assert escalation(schema, loose, answer('{"x": 1}')) is None
    broken = {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}
    assert escalation(schema, broken, answer('{"x": 1}')) is None
    assert escalation(schema, broken, answer("not json")) == "schema"
    # values of the wrong type where an upstream's answer has text and logprobs
    strict = {"response_format": {"type": "json_object"}}
    odd_content = {"choices": [{"message": {"content": 5}}, {"message": {"content": None}}]}
    assert escalation(schema, strict, odd_content) == "schema"
    deep = "[" * 100_000 + "]" * 100_000
    assert escalation(schema, strict, answer(deep)) == "schema"
    sure = CascadeSettings(models=["a", "b"], escalate_on=["logprob"], min_mean_logprob=-1.0)
    odd_logprobs = {
        "choices": [
            {"logprobs": {"content": "x", "token_logprobs": ["-9", True, None, 10**400]}},
            {"logprobs": {"content": [{"logprob": "-9"}, {"logprob": -0.5}]}},
        ]
    }
    assert escalation(sure, {}, odd_logprobs) is None  # only -0.5 is a logprob


def sse_raw(*parts: bytes, pause_s: float = 0.0) -> Handler:
    """A stream written as the given raw parts (`pause_s` between them)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(pause_s)
        await response.write_eof()
        return response

    return handler


async def relayed(upstream_call: UpstreamCall, answer: Any) -> list[str]:
    return [frame async for frame in upstream_call.frames(answer)]


async def open_stream(servers: Servers, handler: Handler) -> tuple[UpstreamCall, Answer]:
    """A streamed call of `m` on upstream x alone (answering with `handler`), opened."""
    backends = backends_with(servers, {"x": handler})
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    return upstream_call, answer


async def test_streams_that_always_break_after_their_first_event_open_the_breaker(
    servers: Servers,
) -> None:
    # each stream answers (its first event arrives) and then breaks: a failure every time,
    # so the breaker opens as it would for any other failure
    backends = backends_with(servers, {"x": sse_handler([FIRST, FIRST])}, breaker_failures=3)
    backends.by_model["m"] = [backends.upstreams[0]]
    x = backends.upstreams[0]
    for _ in range(3):
        upstream_call = call(backends, stream=True)
        answer = await upstream_call.open()
        assert isinstance(answer, Answer)
        with pytest.raises(UpstreamError):
            await relayed(upstream_call, answer)
        await upstream_call.close(upstream_call.error)
    assert x.state == "open"
    # a whole stream closes it again (and counts as the success, at its end)
    servers.handlers["x"] = sse_handler([FIRST, "[DONE]"])
    x.breaker.reset()
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    x.failed(proxy.UpstreamFailure("x", "stream_cut", "earlier"))
    assert x.breaker.failure_count == 1
    await relayed(upstream_call, answer)
    await upstream_call.close()
    assert x.breaker.failure_count == 0
    # so does a good stream the client leaves early: the upstream did its part
    x.failed(proxy.UpstreamFailure("x", "stream_cut", "earlier"))
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    await upstream_call.close(ClientDisconnected())
    assert x.breaker.failure_count == 0


async def test_keep_alive_comments_do_not_stretch_the_wait_for_the_next_event(
    servers: Servers,
) -> None:
    pings = [f"data: {FIRST}\n\n".encode(), *([b": ping\n\n"] * 40)]
    backends = backends_with(servers, {"x": sse_raw(*pings, pause_s=0.05)})
    backends.by_model["m"] = [backends.upstreams[0]]
    backends.upstreams[0].settings.timeouts.first_token_s = 0.5
    upstream_call = call(backends, stream=True)
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    started = time.monotonic()
    with pytest.raises(UpstreamError):
        await relayed(upstream_call, answer)
    assert time.monotonic() - started < 1.5  # not the 2 s of pings
    attempts = Attempts()
    upstream_call.metrics = attempts  # type: ignore[assignment]
    await upstream_call.close(upstream_call.error)
    assert backends.upstreams[0].breaker.failure_count == 1


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_every_sse_line_ending_is_a_line_ending(servers: Servers, ending: bytes) -> None:
    # SSE allows LF, CRLF and a lone CR; split across writes, a CRLF is still one line end
    usage = '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
    events = [f"data: {FIRST}", f"data: {usage}", "data: [DONE]"]
    body = b"".join(event.encode() + ending * 2 for event in events)
    parts = [body[i : i + 7] for i in range(0, len(body), 7)]
    upstream_call, answer = await open_stream(servers, sse_raw(*parts, pause_s=0.01))
    frames = await relayed(upstream_call, answer)
    assert frames == [f"data: {FIRST}\n\n", "data: [DONE]\n\n"]
    assert upstream_call.usage == (3, 1)


@pytest.mark.parametrize(
    "error",
    [
        b'event: error\ndata: {"error": {"message": "evt boom", "code": 500}}\n\n',
        b'data:{"error": {"message": "evt boom", "type": "server_error"}}\n\n',
        b'data: {"error": "evt boom", "error_type": "generation"}\n\n',  # TGI's
    ],
    ids=["event-line", "no-space", "tgi"],
)
async def test_an_upstream_error_event_reaches_the_client_in_openais_shape(
    servers: Servers, error: bytes
) -> None:
    parts = (f"data: {FIRST}\n\n".encode(), error, b"data: [DONE]\n\n")
    upstream_call, answer = await open_stream(servers, sse_raw(*parts))
    frames = await relayed(upstream_call, answer)
    assert frames[-1] == "data: [DONE]\n\n"
    sent = json.loads(frames[1].removeprefix("data: "))
    assert sent["error"] == {
        "message": "evt boom",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    assert upstream_call.error is not None and upstream_call.error.message == "evt boom"
    assert answer.upstream.breaker.failure_count == 1  # a 5xx-like failure of the upstream


@pytest.mark.parametrize(("code", "failover"), [(500, True), (400, False)])
async def test_an_error_as_the_first_event_is_a_failure_or_the_clients_error(
    servers: Servers, code: int, failover: bool
) -> None:
    # nothing reached the client yet: a failure falls back, a refusal is the client's 400
    first = json.dumps({"error": {"message": "no", "code": code}})
    backends = backends_with(
        servers, {"x": sse_handler([first, "[DONE]"]), "y": sse_handler([FIRST, "[DONE]"])}
    )
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends, stream=True, retries=0)
    if failover:
        answer = await upstream_call.open()
        assert isinstance(answer, Answer) and answer.model == "fb"
    else:
        with pytest.raises(InvalidRequest) as raised:
            await upstream_call.open()
        assert raised.value.message == "no"


async def test_output_without_usage_is_still_counted(servers: Servers) -> None:
    # spaced JSON (Python's json.dumps default) and no usage chunk: the events count
    spaced = json.dumps({"choices": [{"index": 0, "delta": {"content": "tok "}}]})
    upstream_call, answer = await open_stream(servers, sse_handler([spaced, spaced, "[DONE]"]))
    await relayed(upstream_call, answer)
    assert upstream_call.usage is None and upstream_call.output_tokens == 2
    # a whole answer without usage: estimated from its text (4 characters a token)
    no_usage = {k: v for k, v in OK_BODY.items() if k != "usage"}
    no_usage["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "x" * 40}}]

    async def bare(request: web.Request) -> web.StreamResponse:
        return web.json_response(no_usage)

    servers.handlers["x"] = bare
    upstream_call = call(servers.registries[-1])
    answer = await upstream_call.open()
    assert isinstance(answer, Answer)
    assert upstream_call.usage is None and upstream_call.output_tokens == 10


def test_output_detection_and_estimates() -> None:
    assert proxy._has_output('{"delta": {"content" : "a"}}')
    assert proxy._has_output('{"delta":{"reasoning_content":"a"}}')
    assert proxy._has_output('{"type":"response.output_text.delta","delta":"a"}')
    assert not proxy._has_output('{"delta": {"content": ""}}')
    assert not proxy._has_output('{"delta": {"content": null, "role": "assistant"}}')
    answer = {
        "choices": [
            {"message": {"content": "abcd", "tool_calls": [{"function": {"arguments": "{}xx"}}]}},
            {"text": "abcdefgh"},
        ],
        "usage": None,
    }
    assert proxy.estimate_output_tokens(answer) == 4
    responses = {"output": [{"content": [{"type": "output_text", "text": "x" * 9}]}]}
    assert proxy.estimate_output_tokens(responses) == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "bad thing"}}, "bad thing"),
        ({"error": "plain text"}, "plain text"),
        ({"detail": "not allowed"}, "not allowed"),
        ({"detail": [{"loc": ["body"], "msg": "x"}]}, '[{"loc": ["body"], "msg": "x"}]'),
        ({"message": "top level"}, "top level"),
        ({}, None),
    ],
)
def test_an_upstreams_error_message_is_found_whatever_its_shape(
    body: dict[str, Any], message: str | None
) -> None:
    assert proxy.message_of(body) == message


async def test_a_cascades_try_escalates_instead_of_taking_the_static_fallback(
    servers: Servers,
) -> None:
    backends = backends_with(
        servers,
        {"x": failing(500, 99), "y": failing(500, 99)},
        retries=0,
        static_fallback={"m": "Busy; retry."},
    )
    trial = call(backends)
    trial.static_model = None
    with pytest.raises(UpstreamError):  # a failure the cascade escalates on
        await trial.open()
    answer = await call(backends).open()  # the last model (or no cascade): the message
    assert not isinstance(answer, Answer) and b"Busy; retry." in bytes(answer.body)


async def test_the_static_fallback_is_the_first_models_wherever_the_chain_ends(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static message of the model the chain began with answers when the whole chain
    failed: also from the call for the chain's rest (after a hand-over to the engine) and
    when the chain ended at a busy engine (it was looked up by the rest's first model, and
    not at all after the engine)."""
    backends = backends_with(
        servers,
        {"x": failing(500, 99), "y": failing(500, 99)},
        retries=0,
        static_fallback={"m": "Busy; retry."},
    )
    rest = call(backends, chain=("fb",))
    rest.static_model = "m"
    answer = await rest.open()
    assert not isinstance(answer, Answer) and b"Busy; retry." in bytes(answer.body)
    assert rest.response_headers["x-sluice-model"] == "m"

    async def hand_over(self: Generation, *args: Any) -> Response:
        raise LocalHandoff(1, 1)  # the upstream part failed and handed over to the engine

    async def busy(raw: dict[str, Any]) -> Response:
        raise Overloaded("The engine is overloaded.")

    monkeypatch.setattr(Generation, "_upstream", hand_over)
    request = SimpleNamespace(scope={}, app=SimpleNamespace(state=SimpleNamespace(metrics=None)))
    generation = dataclasses.replace(
        _generation(Principal("anonymous"), settings(static_fallback={"m": "Busy; retry."})),
        request=request,  # type: ignore[arg-type]
        backends=backends,
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    streamed = await generation._serve_chain(body, "chat", ("m", "local"), "m", busy)
    assert b"Busy; retry." in bytes(streamed.body) and bytes(streamed.body).endswith(b"[DONE]\n\n")
    assert response_headers(request.scope)["x-sluice-fallback"] == "static"  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable):  # a cascade's try escalates instead
        await generation._serve_chain(body, "chat", ("m", "local"), "m", busy, False)
    with pytest.raises(ServiceUnavailable):  # no static message for this chain's models
        await generation._serve_chain(body, "chat", ("n", "local"), "n", busy)
    # a route's chain starts with its cheapest model: the first that has a message answers
    routed = await generation._serve_chain(body, "chat", ("n", "m", "local"), "auto", busy)
    assert b"Busy; retry." in bytes(routed.body)

    async def no_store(raw: dict[str, Any]) -> Response:
        raise StoreUnavailable("The limits store is down.")

    with pytest.raises(StoreUnavailable):  # not a backend's failure: no static answer
        await generation._serve_chain(body, "chat", ("m", "local"), "m", no_store)
    # `"stream": 1` was a stream for the engine, so the static answer is one too
    one = await generation._serve_chain({**body, "stream": 1}, "chat", ("m", "local"), "m", busy)
    assert bytes(one.body).startswith(b"data: ")


async def test_an_attempt_cancelled_before_its_answer_is_counted(servers: Servers) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response(OK_BODY)

    backends = backends_with(servers, {"x": hang})
    backends.by_model["m"] = [backends.upstreams[0]]
    attempts = Attempts()
    upstream_call = call(backends, attempts=attempts)
    task = asyncio.ensure_future(upstream_call.open())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await upstream_call.close(ClientDisconnected())
    assert attempts.seen == [("x", 1, "client_closed")]
    assert backends.upstreams[0].outstanding == 0


async def test_an_event_ended_by_a_lone_cr_is_relayed_before_more_data_comes(
    servers: Servers,
) -> None:
    # a CR at the end of what arrived may be half a CRLF, but it ends the line already
    parts = (f"data: {FIRST}\r\r".encode(), b"data: [DONE]\r\r")
    backends = backends_with(servers, {"x": sse_raw(*parts, pause_s=1.0)})
    backends.by_model["m"] = [backends.upstreams[0]]
    started = time.monotonic()
    answer = await call(backends, stream=True).open()
    assert isinstance(answer, Answer) and answer.first_event == f"data: {FIRST}"
    assert time.monotonic() - started < 0.8


async def test_a_4xx_error_event_mid_stream_keeps_its_meaning(servers: Servers) -> None:
    error = b'data: {"error": {"message": "bad schema", "code": 400, "param": "tools"}}\n\n'
    parts = (f"data: {FIRST}\n\n".encode(), error, b"data: [DONE]\n\n")
    upstream_call, answer = await open_stream(servers, sse_raw(*parts))
    frames = await relayed(upstream_call, answer)
    sent = json.loads(frames[1].removeprefix("data: "))["error"]
    assert (sent["type"], sent["param"], sent["message"]) == (
        "invalid_request_error",
        "tools",
        "bad schema",
    )
    assert answer.upstream.breaker.failure_count == 0  # the request's fault, not the upstream's


async def test_an_upstreams_429_is_the_upstreams_limit_not_the_keys(servers: Servers) -> None:
    # a cascade escalates past it (generation.py); the client still sees OpenAI's 429
    async def limited(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow"}}, status=429)

    backends = backends_with(servers, {"x": limited, "y": limited}, retries=0)
    with pytest.raises(proxy.UpstreamRateLimited) as raised:
        await call(backends).open()
    assert isinstance(raised.value, RateLimitExceeded)


@pytest.mark.parametrize("limit", ["MAX_LINE_BYTES", "MAX_EVENT_BYTES"])
async def test_an_event_past_its_size_limit_breaks_the_stream(
    servers: Servers, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    # one line too long, or many short `data:` lines that never end their event
    monkeypatch.setattr(proxy, limit, 4096)
    endless = b"".join(b"data: " + b"x" * 100 + b"\n" for _ in range(100))
    raw = b"data: " + b"x" * 8192 + b"\n\n" if limit == "MAX_LINE_BYTES" else endless
    upstream_call, answer = await open_stream(servers, sse_raw(f"data: {FIRST}\n\n".encode(), raw))
    with pytest.raises(UpstreamError):
        await relayed(upstream_call, answer)
    assert answer.upstream.breaker.failure_count == 1


@settings_of_hypothesis(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="ab :\u00e9", max_size=20), min_size=1, max_size=8),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=30),
)
def test_lines_come_out_whole_however_the_bytes_are_split(
    lines: list[str], ending: bytes, cuts: list[int]
) -> None:
    """`_lines` yields the same lines whatever chunks the bytes arrive in (a chunk may end
    inside a CRLF or inside a UTF-8 character)."""
    raw = b"".join(line.encode() + ending for line in lines)
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(raw[at : at + cut])
        at += cut
    chunks.append(raw[at:])

    class Content:
        async def iter_any(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                if chunk:
                    yield chunk

    async def collect() -> list[str]:
        return [line async for line in proxy._lines(Content())]  # type: ignore[arg-type]

    assert asyncio.run(collect()) == lines


async def test_an_answer_past_its_size_limit_is_a_failure_and_falls_back(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "MAX_BODY_BYTES", 1024)

    async def huge(request: web.Request) -> web.StreamResponse:
        body = dict(OK_BODY, padding="x" * 4096)
        return web.json_response(body)

    backends = backends_with(servers, {"x": huge}, retries=0)
    backends.by_model["m"] = [backends.upstreams[0]]  # m on x only; y serves fb
    answer = await call(backends).open()
    assert isinstance(answer, Answer) and answer.model == "fb"
    assert backends.upstreams[0].breaker.failure_count == 1


async def test_nothing_after_done_reaches_the_client(servers: Servers) -> None:
    # an upstream that goes on after [DONE] (and leaves the connection open)
    upstream_call, answer = await open_stream(
        servers,
        sse_raw(
            f"data: {FIRST}\n\ndata: [DONE]\n\n".encode(),
            b'data: {"choices":[{"index":0,"delta":{"content":"late"}}]}\n\n',
            pause_s=5.0,
        ),
    )
    frames = await asyncio.wait_for(relayed(upstream_call, answer), 2.0)
    assert frames[-1] == "data: [DONE]\n\n" and not any("late" in f for f in frames)
    assert upstream_call.error is None


@pytest.mark.parametrize(
    ("usage", "settled"),
    [
        ({"prompt_tokens": -50, "completion_tokens": 1}, "estimate"),
        ({"prompt_tokens": True, "completion_tokens": 1}, "estimate"),
        ({"prompt_tokens": 3, "completion_tokens": -1}, "estimate"),
        ({"prompt_tokens": 10**30, "completion_tokens": 10**30}, (proxy.MAX_PROMPT_TOKENS, 16)),
        ({"prompt_tokens": 3, "completion_tokens": 1}, (3, 1)),
    ],
    ids=["negative", "bool", "negative-output", "huge", "sound"],
)
async def test_usage_an_upstream_reports_is_settled_within_what_the_request_allows(
    servers: Servers, usage: dict[str, Any], settled: Any
) -> None:
    """A negative, boolean or absurd count never reaches a key's budget: counts that are no
    counts fall back to the estimates; output is bounded by the `max_tokens` sent (16)."""

    async def reported(request: web.Request) -> web.StreamResponse:
        return web.json_response(dict(OK_BODY, usage=usage))

    backends = backends_with(servers, {"x": reported})
    backends.by_model["m"] = [backends.upstreams[0]]
    upstream_call = call(backends)
    assert isinstance(await upstream_call.open(), Answer)
    expected = (upstream_call.prompt_estimate, 1) if settled == "estimate" else settled
    assert upstream_call._used(answered=True) == expected


@pytest.mark.parametrize("retry_after", ["nan", "inf", "-5", "1e400", "soon"])
async def test_a_retry_after_that_is_no_delay_is_dropped(
    servers: Servers, retry_after: str
) -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": "slow down"}}, status=429, headers={"retry-after": retry_after}
        )

    backends = backends_with(servers, {"x": limited, "y": limited}, retries=0)
    with pytest.raises(UpstreamRateLimited) as raised:
        await call(backends).open()
    assert raised.value.retry_after_s is None or raised.value.retry_after_s >= 0
    assert error_response(raised.value).status_code == 429


async def test_a_redirect_is_not_followed(servers: Servers) -> None:
    """A 3xx would send the client's prompt wherever the upstream points: it is a failure."""
    followed: list[str] = []

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/elsewhere"):
            followed.append(request.path)
            return web.json_response(OK_BODY)
        raise web.HTTPTemporaryRedirect("/v1/elsewhere")

    backends = backends_with(servers, {"x": elsewhere, "y": elsewhere}, retries=0)
    with pytest.raises(SluiceError) as raised:
        await call(backends).open()
    assert error_response(raised.value).status_code == 502 and followed == []
