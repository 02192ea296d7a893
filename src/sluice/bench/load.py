"""A bounded closed-loop load generator for OpenAI-compatible chat streaming.

`run_load` keeps `concurrency` streaming chat requests in flight until `requests` have been
sent, recording per request the time to first token, the arrival time of every content chunk
and the server-reported completion tokens (`stream_options.include_usage`). It talks plain
HTTP with httpx so it measures any OpenAI-compatible server the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from sluice.bench.stats import inter_token_latencies, percentile


@dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds from its own start)."""

    status: int
    ttft: float | None = None
    latency: float = 0.0
    completion_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None


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

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def itl(self, q: float) -> float:
        gaps = [gap for r in self.ok for gap in inter_token_latencies(r.chunk_times)]
        return percentile(gaps, q)

    def latency(self, q: float) -> float:
        return percentile([r.latency for r in self.ok], q)


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, object], headers: dict[str, str]
) -> RequestRecord:
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record = RequestRecord(status=response.status_code)
            if response.status_code != 200:
                await response.aread()
                record.error = response.text[:200]
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter() - started
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        if record.ttft is None:
                            record.ttft = now
                        record.chunk_times.append(now)
                if chunk.get("usage"):
                    record.completion_tokens = int(chunk["usage"]["completion_tokens"])
            record.latency = time.perf_counter() - started
            return record
    except httpx.HTTPError as exc:
        return RequestRecord(status=0, latency=time.perf_counter() - started, error=repr(exc))


async def run_load(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> LoadResult:
    """Send `requests` streaming chat requests, `concurrency` at a time; bounded by count."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                records.append(await _one(client, url, body, headers))

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        wall = time.perf_counter() - started
    return LoadResult(records=records, wall_s=wall)
