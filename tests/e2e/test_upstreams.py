"""Upstream backends end to end: a front sluice process forwarding to other real sluice
processes (synthetic engine: fast to start, deterministic filler text at a known rate).

The front serves its own synthetic engine too (`synthetic`) and, through its upstreams:
`solo` (A only), `pool` (A and B, balanced), `priced` (B, with its own prices), `primary`
(C only, falling back to `secondary` on B), `ghost` (an upstream that is not there, with a
static fallback) and the alias `fast` → `pool`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from sluice.bench.compare import free_port
from tests.e2e.server import SluiceProcess

ADMIN = "sk-admin-upstreams"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
SECRET = ""  # the front's test key (the cluster fixture makes it)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET}"}


TOKENS_PER_S = 50  # the upstreams' synthetic rate: one token every 20 ms per sequence
GHOST_MESSAGE = "The assistant is unavailable right now; please try again later."


def synthetic(log: Path, *args: str, port: int | None = None) -> SluiceProcess:
    return SluiceProcess(
        log,
        "--engine",
        "synthetic",
        "--synthetic-tokens-per-s",
        str(TOKENS_PER_S),
        *args,
        port=port,
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upstreams")


@pytest.fixture(scope="module")
def cluster(logs: Path) -> Iterator[dict[str, SluiceProcess]]:
    """Upstreams A, B, C and the front (module docstring)."""
    a, b = synthetic(logs / "a.log"), synthetic(logs / "b.log")
    c = synthetic(logs / "c.log", port=free_port())
    config = {
        "backends": [
            {
                "name": "a",
                "base_url": a.api,
                "models": {"solo": "synthetic", "pool": "synthetic"},
                "pricing": {
                    "solo": {"input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.2},
                    "pool": {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1},
                },
                "health_check_interval_s": 0.5,
            },
            {
                "name": "b",
                "base_url": b.api,
                "models": {"pool": "synthetic", "secondary": "synthetic", "priced": "synthetic"},
                "pricing": {"priced": {"input_usd_per_mtok": 100, "output_usd_per_mtok": 1000}},
                "health_check_interval_s": 0.5,
            },
            {
                "name": "c",
                "base_url": c.api,
                "models": {"primary": "synthetic"},
                "health_check_interval_s": 0.5,
                "timeouts": {"connect_s": 1, "first_token_s": 5, "total_s": 30},
            },
            {
                "name": "nowhere",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "models": {"ghost": "synthetic", "lost": "synthetic"},
                "health_check_interval_s": None,
            },
        ],
        "routing": {
            "aliases": {"fast": "pool"},
            "fallbacks": {"primary": ["secondary"], "lost": ["synthetic"]},
            "static_fallback": {"ghost": GHOST_MESSAGE},
            "breaker_failures": 2,
            "breaker_recovery_s": 1,
            "models": {
                "solo": {"context_length": 100, "tags": ["tools"]},
                "pool": {"context_length": 8192},
                "priced": {"context_length": 8192, "tags": ["tools"]},
            },
            "routes": {
                "auto": {"models": ["priced", "pool", "solo"]},
                "thrifty": {"models": ["priced"], "max_usd_per_mtok": 10},
            },
            "cascades": {
                "smart": {"models": ["solo", "pool"], "escalate_on": ["length"]},
                "strict": {"models": ["solo", "pool"], "escalate_on": ["schema"]},
            },
        },
    }
    (logs / "front.yaml").write_text(yaml.safe_dump(config))
    front = SluiceProcess(
        logs / "front.log",
        "--engine",
        "synthetic",
        "--config",
        str(logs / "front.yaml"),
        env={
            "SLUICE_GATEWAY__ADMIN_KEY": ADMIN,
            "SLUICE_GATEWAY__DATABASE": str(logs / "front.db"),
            "SLUICE_GATEWAY__KEY_CACHE_S": "0",
        },
    )
    processes = {"a": a, "b": b, "c": c, "front": front}
    try:
        for process in processes.values():
            process.wait_ready()
        _wait_backends_up(front, {"a", "b", "c"})
        global SECRET  # one key for the module, made once the front is up
        SECRET = _key(front, "tester")
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def _readyz(server: SluiceProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/readyz", timeout=5).json()
    return body


def _wait_backends_up(front: SluiceProcess, names: set[str], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _readyz(front)["backends"]
        if all(states[name]["healthy"] and states[name]["breaker"] == "closed" for name in names):
            return
        time.sleep(0.2)
    raise AssertionError(f"backends not up: {_readyz(front)['backends']}")


def _key(front: SluiceProcess, name: str, **policy: Any) -> str:
    response = httpx.post(
        f"{front.url}/admin/keys", json={"name": name, **policy}, headers=ADMIN_AUTH, timeout=10
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["secret"]
    return secret


def _usage(front: SluiceProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{front.url}/admin/keys/{name}/usage", headers=ADMIN_AUTH, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _events(response: httpx.Response) -> list[tuple[float, str]]:
    """`(arrival time, data)` of each SSE event of a streamed response."""
    events: list[tuple[float, str]] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append((time.monotonic(), line[6:]))
    return events


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Count."}], **extra}


def _metric(server: SluiceProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_lists_every_backend_and_alias(cluster: dict[str, SluiceProcess]) -> None:
    client = openai.OpenAI(base_url=cluster["front"].api, api_key=SECRET, max_retries=0)
    ids = {model.id for model in client.models.list()}
    assert {"synthetic", "solo", "pool", "priced", "primary", "ghost", "fast"} <= ids
    assert client.models.retrieve("fast").id == "fast"


def test_a_stream_keeps_its_chunks_and_their_timing(cluster: dict[str, SluiceProcess]) -> None:
    """The proxy sends each event as it comes: the same chunks as the upstream's own, spread
    over the generation as the upstream spreads them, and the usage chunk only if asked."""
    body = _chat("solo", max_tokens=30, stream=True)
    with httpx.stream("POST", f"{cluster['a'].api}/chat/completions", json={
        **body, "model": "synthetic"}, timeout=30) as direct:  # fmt: skip
        direct_events = _events(direct)
    with httpx.stream(
        "POST", f"{cluster['front'].api}/chat/completions", json=body, headers=auth(), timeout=30
    ) as proxied:
        assert proxied.status_code == 200
        assert proxied.headers["x-sluice-backend"] == "a"
        assert proxied.headers["x-sluice-model"] == "solo"
        proxied_events = _events(proxied)

    def deltas(events: list[tuple[float, str]]) -> list[Any]:
        return [
            [c["delta"] for c in json.loads(data)["choices"]]
            for _, data in events
            if data != "[DONE]"
        ]

    assert deltas(proxied_events) == deltas(direct_events)
    assert proxied_events[-1][1] == "[DONE]"
    assert all("usage" not in json.loads(d) for _, d in proxied_events if d != "[DONE]")
    # 30 tokens at 50/s: about 0.6 s from the first token to the last, not one burst.
    spread = proxied_events[-2][0] - proxied_events[1][0]
    assert spread > 0.3, spread
    times = [at for at, _ in proxied_events[1:-1]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert max(gaps) < 0.5
    with httpx.stream(
        "POST",
        f"{cluster['front'].api}/chat/completions",
        json={**body, "stream_options": {"include_usage": True}},
        headers=auth(),
        timeout=30,
    ) as asked:
        usage = json.loads(_events(asked)[-2][1])["usage"]
    assert usage["completion_tokens"] == 30


def test_the_openai_sdk_through_an_alias(cluster: dict[str, SluiceProcess]) -> None:
    client = openai.OpenAI(base_url=cluster["front"].api, api_key=SECRET, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        **_chat("fast", max_tokens=4)  # type: ignore[arg-type]
    )
    completion = raw.parse()
    assert raw.headers["x-sluice-model"] == "pool"
    assert raw.headers["x-sluice-backend"] in {"a", "b"}
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    text = client.completions.create(model="solo", prompt="one two", max_tokens=3)
    assert text.usage is not None and text.usage.completion_tokens == 3


def test_a_model_on_two_upstreams_is_balanced(cluster: dict[str, SluiceProcess]) -> None:
    """Least outstanding requests: 6 long streams at once land 3 and 3."""
    front = cluster["front"]
    before = {
        n: _metric(front, "sluice_upstream_attempts_total", backend=n, model="pool") for n in "ab"
    }

    def one(_: int) -> str:
        with httpx.stream(
            "POST",
            f"{front.api}/chat/completions",
            json=_chat("pool", max_tokens=40, stream=True),
            headers=auth(),
            timeout=30,
        ) as response:
            backend = response.headers["x-sluice-backend"]
            _events(response)
            return backend

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        backends = list(pool.map(one, range(6)))
    assert sorted(backends) == ["a", "a", "a", "b", "b", "b"]
    after = {
        n: _metric(front, "sluice_upstream_attempts_total", backend=n, model="pool") for n in "ab"
    }
    assert {n: after[n] - before[n] for n in "ab"} == {"a": 3, "b": 3}


def test_upstream_refusals_keep_their_status_and_message(cluster: dict[str, SluiceProcess]) -> None:
    front = cluster["front"]
    response = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", temperature=7),
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]
    # sluice's own checks come first: a cap the upstream does not know
    response = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", max_tokens=10**6),
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    response = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", max_tokens="many"),
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 400


def test_a_client_that_leaves_stops_the_upstream(cluster: dict[str, SluiceProcess]) -> None:
    front, a = cluster["front"], cluster["a"]
    with httpx.stream(
        "POST",
        f"{front.api}/chat/completions",
        json=_chat("solo", max_tokens=1000, stream=True),
        headers=auth(),
        timeout=30,
    ) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        for _ in range(6):
            next(lines)
        assert a.engine_stats()["in_flight"] == 1
    stats = a.wait_idle(10)
    assert stats["running"] == 0 and stats["in_flight"] == 0
    assert _readyz(front)["backends"]["a"]["outstanding"] == 0
    assert _readyz(front)["in_flight"] == 0


def test_spend_is_the_upstreams_usage_at_its_prices(cluster: dict[str, SluiceProcess]) -> None:
    """Budgets and usage count the upstream's own token counts, captured from a stream that
    did not ask for usage, priced at the backend's prices; nothing stays reserved."""
    front = cluster["front"]
    secret = _key(front, "spender", budget_tokens=100_000, tpm=100_000)
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.stream(
        "POST",
        f"{front.api}/chat/completions",
        json=_chat("priced", max_tokens=12, stream=True, stream_options={"include_usage": True}),
        headers=auth,
        timeout=30,
    ) as response:
        usage = json.loads(_events(response)[-2][1])["usage"]
    with httpx.stream(
        "POST",
        f"{front.api}/chat/completions",
        json=_chat("priced", max_tokens=12, stream=True),
        headers=auth,
        timeout=30,
    ) as response:
        assert all("usage" not in json.loads(d) for _, d in _events(response) if d != "[DONE]")
    spent = _usage(front, "spender")
    total = 2 * (usage["prompt_tokens"] + usage["completion_tokens"])
    day = next(iter(spent["windows"].values()))
    assert day["tokens"] == total
    expected_usd = 2 * (usage["prompt_tokens"] * 100 + usage["completion_tokens"] * 1000) / 1e6
    assert day["usd"] == pytest.approx(expected_usd)
    assert spent["reserved"] == {"tokens": 0, "usd": 0.0}
    assert _metric(front, "sluice_generation_tokens_total", model="priced", key="spender") == 24


def test_the_trace_continues_in_the_upstream(cluster: dict[str, SluiceProcess]) -> None:
    """`traceparent` goes to the upstream: its log line carries the front's trace id."""
    front, a = cluster["front"], cluster["a"]
    response = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", max_tokens=2),
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    def line(server: SluiceProcess) -> dict[str, Any]:
        for _ in range(50):
            for text in server.log_path.read_text().splitlines():
                if request_id in text and '"sluice.request"' in text:
                    found: dict[str, Any] = json.loads(text)
                    return found
            time.sleep(0.1)
        raise AssertionError(f"no log line for {request_id} in {server.log_path}")

    front_line, upstream_line = line(front), line(a)
    assert upstream_line["trace_id"] == front_line["trace_id"]
    assert (front_line["backend"], front_line["attempt"], front_line["model"]) == ("a", 1, "solo")


def test_every_answer_says_which_backend_and_attempt_gave_it(
    cluster: dict[str, SluiceProcess],
) -> None:
    """`x-sluice-backend`, `x-sluice-model` and `x-sluice-attempt` on the engine's answers
    too: first try, and after a chain's upstream failed (the engine is the fallback)."""
    client = openai.OpenAI(base_url=cluster["front"].api, api_key=SECRET, max_retries=0)
    direct = client.chat.completions.with_raw_response.create(**_chat("synthetic", max_tokens=4))  # type: ignore[arg-type]
    assert (direct.headers["x-sluice-backend"], direct.headers["x-sluice-attempt"]) == (
        "engine",
        "1",
    )
    rescued = client.chat.completions.with_raw_response.create(**_chat("lost", max_tokens=4))  # type: ignore[arg-type]
    assert rescued.headers["x-sluice-backend"] == "engine"
    assert rescued.headers["x-sluice-model"] == "synthetic"
    assert int(rescued.headers["x-sluice-attempt"]) >= 2  # after the unreachable upstream
    upstream = client.chat.completions.with_raw_response.create(**_chat("solo", max_tokens=4))  # type: ignore[arg-type]
    assert (upstream.headers["x-sluice-backend"], upstream.headers["x-sluice-attempt"]) == (
        "a",
        "1",
    )


def test_the_static_fallback_answers_when_nothing_can(cluster: dict[str, SluiceProcess]) -> None:
    front = cluster["front"]
    client = openai.OpenAI(base_url=front.api, api_key=SECRET, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**_chat("ghost"))  # type: ignore[arg-type]
    assert raw.headers["x-sluice-fallback"] == "static"
    assert raw.headers["x-sluice-backend"] == "static"
    assert raw.parse().choices[0].message.content == GHOST_MESSAGE
    chunks = list(client.chat.completions.create(**_chat("ghost", stream=True)))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GHOST_MESSAGE
    assert _metric(front, "sluice_static_fallbacks_total", model="ghost") >= 2


def test_an_upstream_killed_mid_load_falls_back_then_recovers(
    cluster: dict[str, SluiceProcess], logs: Path
) -> None:
    """Requests to `primary` (upstream C) run back to back from two clients; C is killed:
    no request fails, the first one served by the fallback comes within a second or two, the
    breaker opens; C comes back on its port: a half-open probe closes the breaker and C
    serves again."""
    front, c = cluster["front"], cluster["c"]
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30, headers=auth()) as client:
            while not stop.is_set():
                response = client.post(
                    f"{front.api}/chat/completions", json=_chat("primary", max_tokens=10)
                )
                results.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("x-sluice-model", ""),
                    )
                )

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(10)
        time.sleep(3.0)
        states = _readyz(front)["backends"]["c"]
        assert states["breaker"] in {"open", "half_open"} or not states["healthy"]
        restarted = synthetic(logs / "c.log", port=c.port)
        cluster["c"] = restarted
        restarted.wait_ready()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            results and results[-1][2] == "primary" and results[-1][0] > killed_at + 3
        ):
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200]
    before = [r for r in results if r[0] < killed_at]
    assert before and all(model == "primary" for _, _, model in before)
    fallback = [t for t, _, model in results if model == "secondary" and t > killed_at]
    assert fallback and fallback[0] - killed_at < 2.0, fallback[:1]
    assert results[-1][2] == "primary"
    _wait_backends_up(front, {"c"})
    assert _metric(front, "sluice_circuit_breaker_state", backend="c") == 0


def _post(front: SluiceProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{front.api}/chat/completions", json=body, headers=auth(), timeout=30)


def test_a_routing_alias_picks_the_cheapest_model_that_fits(
    cluster: dict[str, SluiceProcess],
) -> None:
    """`auto` over priced (tools, expensive), pool (no tools) and solo (tools, cheapest, a
    100-token context): what fits decides, then the price."""
    front = cluster["front"]
    small = _post(front, _chat("auto", max_tokens=10))
    assert small.headers["x-sluice-model"] == "solo"
    long = _post(front, _chat("auto", max_tokens=200))
    assert long.headers["x-sluice-model"] == "pool"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tools = _post(front, _chat("auto", max_tokens=200, tools=[tool]))
    assert tools.status_code == 200, tools.text
    assert tools.headers["x-sluice-model"] == "priced"
    refused = _post(front, _chat("thrifty", max_tokens=10))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "no_model_fits"
    assert "price" in error["message"] and "1000" in error["message"]
    huge = [{"role": "user", "content": "many words " * 4000}]  # about 11,000 tokens
    too_long = _post(front, {**_chat("auto", max_tokens=10, tools=[tool]), "messages": huge})
    assert too_long.status_code == 400
    assert "context length" in too_long.json()["error"]["message"]


def test_a_cascade_escalates_when_its_signal_fires(cluster: dict[str, SluiceProcess]) -> None:
    """The synthetic engine writes filler until `max_tokens` (finish_reason length) unless a
    stop string ends it, and never JSON."""
    front = cluster["front"]
    escalated = _post(front, _chat("smart", max_tokens=5))
    assert escalated.headers["x-sluice-cascade"] == "solo,pool"
    assert escalated.headers["x-sluice-model"] == "pool"
    kept = _post(front, _chat("smart", max_tokens=30, stop=[" nine"]))
    assert kept.headers["x-sluice-cascade"] == "solo"
    assert kept.headers["x-sluice-model"] == "solo"
    assert kept.json()["choices"][0]["finish_reason"] == "stop"
    client = openai.OpenAI(base_url=front.api, api_key=SECRET, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            **_chat("smart", max_tokens=30, stop=[" nine"], stream=True),  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == kept.json()["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None
    not_json = _post(front, _chat("strict", max_tokens=5, response_format={"type": "json_object"}))
    assert not_json.headers["x-sluice-cascade"] == "solo,pool"
    plain = _post(front, _chat("strict", max_tokens=5))
    assert plain.headers["x-sluice-cascade"] == "solo"
    as_read = _post(front, _chat("smart", max_tokens=30, stop=[" nine"], stream="false"))
    assert as_read.headers["content-type"].startswith("application/json")
    assert as_read.json()["choices"][0]["finish_reason"] == "stop"


def test_bodies_no_server_takes_are_refused_before_any_upstream(
    cluster: dict[str, SluiceProcess],
) -> None:
    """Refused as the engine's endpoints refuse them, never sent on (vLLM answers such a body
    with a 500, which counted against the upstream's breaker): an integer past 64 bits
    anywhere, `stream` on embeddings."""
    front = cluster["front"]
    before = _metric(front, "sluice_upstream_attempts_total", backend="a")
    for body, param in [
        (_chat("solo", max_tokens=2, top_k=2**64), "top_k"),
        (_chat("solo", max_tokens=2, seed=-(2**63) - 1), "seed"),
        (
            _chat(
                "solo",
                max_tokens=2,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": 10**23}},
                },
            ),
            "response_format.json_schema.schema.maximum",
        ),
    ]:
        refused = _post(front, body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param
    streamed = httpx.post(
        f"{front.api}/embeddings",
        json={"model": "solo", "input": "x", "stream": True},
        headers=auth(),
        timeout=30,
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    assert _metric(front, "sluice_upstream_attempts_total", backend="a") == before
    assert _readyz(front)["backends"]["a"]["breaker"] == "closed"


def test_a_client_that_leaves_during_a_cascade_try_is_a_499(
    cluster: dict[str, SluiceProcess],
) -> None:
    """The first try of `smart` (200 tokens at 50/s: 4 s) is cut by the client after 1 s:
    the request's log line says 499 `client_closed_request` (a try cut short was read as
    JSON and logged as a 400)."""
    front = cluster["front"]
    request_id = f"cascade-leaves-{time.monotonic_ns()}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{front.api}/chat/completions",
            json=_chat("smart", max_tokens=200),
            headers={**auth(), "x-request-id": request_id},
            timeout=1.0,
        )
    found: dict[str, Any] | None = None
    for _ in range(100):
        for text in front.log_path.read_text().splitlines():
            if request_id in text and '"sluice.request"' in text:
                found = json.loads(text)
        if found is not None:
            break
        time.sleep(0.1)
    assert found is not None, f"no log line for {request_id}"
    assert found["status"] == 499, found


def test_a_stalled_upstream_times_out_to_the_fallback_and_is_marked_down(
    cluster: dict[str, SluiceProcess],
) -> None:
    """C stopped (SIGSTOP: connections open, nothing answers): a stream gives up after C's
    first-token limit (5 s) and the fallback answers it (a body not streamed waits for C's
    `total_s`: nothing tells a stalled upstream from a long answer); the health check
    (1 s limit) marks C down, so the next requests go straight to the fallback; SIGCONT
    brings C back."""
    front, c = cluster["front"], cluster["c"]
    _wait_backends_up(front, {"c"})
    c.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with httpx.stream(
            "POST",
            f"{front.api}/chat/completions",
            json=_chat("primary", max_tokens=3, stream=True),
            headers=auth(),
            timeout=30,
        ) as first:
            assert first.status_code == 200
            assert first.headers["x-sluice-model"] == "secondary"
            assert _events(first)[-1][1] == "[DONE]"
        waited = time.monotonic() - started
        assert waited < 12, waited
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _readyz(front)["backends"]["c"]["healthy"]:
            time.sleep(0.2)
        assert not _readyz(front)["backends"]["c"]["healthy"]
        started = time.monotonic()
        quick = _post(front, _chat("primary", max_tokens=3))
        assert quick.headers["x-sluice-model"] == "secondary"
        assert time.monotonic() - started < 2
    finally:
        c.proc.send_signal(signal.SIGCONT)
    _wait_backends_up(front, {"c"})
    deadline = time.monotonic() + 10
    served = ""
    while time.monotonic() < deadline and served != "primary":
        served = _post(front, _chat("primary", max_tokens=3)).headers["x-sluice-model"]
    assert served == "primary"


def test_models_are_scoped_to_the_key(cluster: dict[str, SluiceProcess]) -> None:
    front = cluster["front"]
    secret = _key(front, "solo-only", models=["solo", "fast"])
    client = openai.OpenAI(base_url=front.api, api_key=secret, max_retries=0)
    assert {model.id for model in client.models.list()} == {"solo", "fast"}
    refused = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("pool", max_tokens=2),
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"


def test_the_responses_api_through_an_upstream(cluster: dict[str, SluiceProcess]) -> None:
    """`/v1/responses` events (named `event:` lines) pass through as they are, and the usage
    of `response.completed` is what the key is charged."""
    front = cluster["front"]
    client = openai.OpenAI(base_url=front.api, api_key=SECRET, max_retries=0)
    response = client.responses.create(model="solo", input="Count.", max_output_tokens=5)
    assert response.usage is not None and response.usage.output_tokens == 5
    events = list(
        client.responses.create(model="solo", input="Count.", max_output_tokens=5, stream=True)
    )
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 5


def test_the_keys_max_tokens_bounds_an_upstream_answer(cluster: dict[str, SluiceProcess]) -> None:
    """A body without max_tokens goes upstream with the cap (the key's here), so the
    output stays within what was reserved, as on the engine."""
    front = cluster["front"]
    secret = _key(front, "capped", max_tokens=4)
    auth_capped = {"Authorization": f"Bearer {secret}"}
    answer = httpx.post(
        f"{front.api}/chat/completions", json=_chat("solo"), headers=auth_capped, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    over = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", max_completion_tokens=5),
        headers=auth_capped,
        timeout=30,
    )
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_completion_tokens"


def test_what_sluice_read_is_what_the_upstream_gets_and_what_is_reserved(
    cluster: dict[str, SluiceProcess],
) -> None:
    """`"stream": "false"` is not a stream anywhere (a JSON answer, its usage charged);
    ten prompts reserve ten completions, as on the engine (over the key's TPM: 429)."""
    front = cluster["front"]
    secret = _key(front, "lister", tpm=1000)
    headers = {"Authorization": f"Bearer {secret}"}
    plain = httpx.post(
        f"{front.api}/chat/completions",
        json=_chat("solo", max_tokens=3, stream="false"),
        headers=headers,
        timeout=30,
    )
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("application/json")
    assert plain.json()["usage"]["completion_tokens"] == 3
    many = httpx.post(
        f"{front.api}/completions",
        json={"model": "solo", "prompt": ["one"] * 10, "max_tokens": 400},
        headers=headers,
        timeout=30,
    )
    assert many.status_code == 429, many.text
    assert many.json()["error"]["code"] == "rate_limit_exceeded"


def test_zz_nothing_stays_reserved_or_in_flight(cluster: dict[str, SluiceProcess]) -> None:
    """After every path above (answers, refusals, disconnects, fallbacks, a killed
    upstream, static answers, cascades): no reservation, slot or upstream count is left."""
    front = cluster["front"]
    assert _usage(front, "tester")["reserved"] == {"tokens": 0, "usd": 0.0}
    state = _readyz(front)
    assert state["in_flight"] == 0
    assert all(backend["outstanding"] == 0 for backend in state["backends"].values())
