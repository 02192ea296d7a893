"""A client that goes away aborts its engine request: streaming, non-streaming and queued."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess

LONG = {
    "model": MODEL,
    "prompt": "Count from 1 to 1000: 1, 2, 3,",
    "max_tokens": 1000,
    "temperature": 0,
}


async def _hold(client: httpx.AsyncClient, url: str, stream: bool) -> None:
    body = {**LONG, "stream": stream}
    if stream:
        async with client.stream("POST", url, json=body) as response:
            async for _ in response.aiter_bytes():
                pass
    else:
        await client.post(url, json=body)


async def test_disconnect_aborts_running_and_queued_requests(server: SluiceProcess) -> None:
    url = f"{server.api}/completions"
    # 7 requests on a server with max 4 concurrent sequences: 4 run, 3 wait in vLLM's queue.
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(_hold(client, url, stream=i % 2 == 0)) for i in range(7)]
        deadline = time.monotonic() + 60
        stats = server.engine_stats()
        while time.monotonic() < deadline:
            stats = server.engine_stats()
            if stats["running"] == 4 and stats["waiting"] == 3:
                break
            await asyncio.sleep(0.2)
        assert (stats["running"], stats["waiting"]) == (4, 3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # sluice's engine gauges are the engine's own figures while it drops the aborted
        # requests: never a 0 while vLLM still reports work.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            scraped = _engine_gauges((await client.get(f"{server.url}/metrics")).text)
            assert scraped["sluice_engine_running"] == scraped["vllm:num_requests_running"]
            assert scraped["sluice_engine_waiting"] == scraped["vllm:num_requests_waiting"]
            await asyncio.sleep(0.05)
    stats = server.wait_idle(timeout_s=10)
    assert (stats["running"], stats["waiting"], stats["in_flight"]) == (0, 0, 0)


def _engine_gauges(text: str) -> dict[str, float]:
    names = (
        "sluice_engine_running",
        "sluice_engine_waiting",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
    )
    found = {
        line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{", 1)[0] in names
    }
    assert set(found) == set(names), found
    return found
