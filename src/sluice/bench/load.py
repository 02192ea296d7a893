"""A bounded load generator for OpenAI-compatible servers.

`run_spec` sends a list of requests (chat or completions, streamed or not) at a fixed
concurrency or at an open-loop arrival rate, until all have been sent or `timeout_s` has
passed, recording per request the time to first token, the arrival time of every content
chunk and the server-reported token counts (`stream_options.include_usage`). It talks plain
HTTP with httpx so it measures any OpenAI-compatible server the same way.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from sluice.bench.stats import inter_token_latencies, percentile
from sluice.bench.workload import Arrival, Shape


@dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds from its own start)."""

    status: int
    ttft: float | None = None
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None
    sent_at: float = 0.0
    # True when the server sent no usage in its stream (llama-cpp-python ignores
    # `stream_options`): completion_tokens is then the count of content chunks, which is the
    # token count for servers that send one token per chunk, and prompt_tokens stays 0.
    tokens_from_chunks: bool = False


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall_s: float

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == 200 and r.error is None]

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall_s

    @property
    def input_tokens_per_s(self) -> float:
        return sum(r.prompt_tokens for r in self.ok) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall_s

    def errors_by_status(self) -> dict[str, int]:
        """Failed requests by HTTP status ("0" = no response; "200" = error inside a stream)."""
        counts: dict[str, int] = {}
        for record in self.records:
            if record.status != 200 or record.error is not None:
                key = str(record.status)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def goodput(
        self, *, max_latency_s: float | None = None, max_ttft_s: float | None = None
    ) -> float:
        """Share of all requests that succeeded within the latency objectives given."""
        if not self.records:
            return math.nan
        good = [
            r
            for r in self.ok
            if (max_latency_s is None or r.latency <= max_latency_s)
            and (max_ttft_s is None or (r.ttft is not None and r.ttft <= max_ttft_s))
        ]
        return len(good) / len(self.records)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def itl(self, q: float) -> float:
        gaps = [gap for r in self.ok for gap in inter_token_latencies(r.chunk_times)]
        return percentile(gaps, q)

    def latency(self, q: float) -> float:
        return percentile([r.latency for r in self.ok], q)


@dataclass(frozen=True)
class LoadSpec:
    """What every request of a run has in common."""

    model: str
    endpoint: str = "chat"  # "chat" or "completions"
    stream: bool = True
    api_key: str | None = None

    def body(self, shape: Shape) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.model,
            "max_tokens": shape.max_tokens,
            "temperature": 0,
            "stream": self.stream,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": shape.prompt}]
        else:
            body["prompt"] = shape.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @property
    def path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)


def bearer(api_key: str | None) -> dict[str, str]:
    """The Authorization header for `api_key` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _note_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
    if usage:
        record.prompt_tokens = int(usage.get("prompt_tokens", 0))
        record.completion_tokens = int(usage.get("completion_tokens", 0))


def _has_text(choice: dict[str, Any]) -> bool:
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestRecord:
    started = time.perf_counter()
    record = RequestRecord(status=0, sent_at=started)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                record.error = response.text[:200]
            elif not body.get("stream"):
                await response.aread()
                record.ttft = time.perf_counter() - started
                _note_usage(record, response.json().get("usage"))
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter() - started
                    if "error" in chunk:
                        record.error = str(chunk["error"].get("message"))
                    if any(_has_text(choice) for choice in chunk.get("choices") or ()):
                        if record.ttft is None:
                            record.ttft = now
                        record.chunk_times.append(now)
                    _note_usage(record, chunk.get("usage"))
                if record.completion_tokens == 0 and record.chunk_times:
                    record.completion_tokens = len(record.chunk_times)
                    record.tokens_from_chunks = True
    except httpx.HTTPError as exc:
        record.error = repr(exc)
    record.latency = time.perf_counter() - started
    return record


async def run_spec(
    base_url: str,
    spec: LoadSpec,
    shapes: Sequence[Shape],
    arrival: Arrival,
    *,
    timeout_s: float = 600.0,
    seed: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Send one request per shape, arriving as `arrival` says; bounded by count and time.

    Closed loop keeps `arrival.concurrency` requests in flight; open loop sends each request
    at its drawn offset (at most `arrival.concurrency` in flight when set, the rest wait).
    Requests still running at `timeout_s` are cancelled and not recorded.
    """
    url = base_url.rstrip("/") + spec.path
    offsets = arrival.offsets(len(shapes), seed)
    in_flight = arrival.concurrency or len(shapes) or 1
    slots = asyncio.Semaphore(in_flight)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()

        async def send(index: int) -> None:
            delay = started + offsets[index] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots:
                record = await _one(client, url, spec.body(shapes[index]), spec.headers)
            record.sent_at -= started
            records.append(record)
            if on_done is not None:
                on_done(record)

        if arrival.rate is None:
            # Closed loop: `in_flight` workers take the next request as each one finishes.
            queue = iter(range(len(shapes)))

            async def worker() -> None:
                for index in queue:
                    await send(index)

            tasks = [asyncio.ensure_future(worker()) for _ in range(in_flight)]
        else:
            tasks = [asyncio.ensure_future(send(i)) for i in range(len(shapes))]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        wall = time.perf_counter() - started
    return LoadResult(records=records, wall_s=wall)
