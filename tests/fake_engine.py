"""A fake `Engine` for API tests: whitespace tokens, scripted output, no model.

It records what it was asked (requests, aborts) and can be told to be slow, to fail, or to
hold requests in a queue, so tests can check the gateway's behaviour without vLLM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from sluice.engine.protocol import (
    Delta,
    EngineFailure,
    EngineStats,
    GenerationRequest,
    ModelCard,
    TokenLogprob,
)

MODEL_ID = "fake-model"


@dataclass
class FakeEngine:
    max_model_len: int = 256
    token_delay_s: float = 0.0
    fail_after_tokens: int | None = None
    start_delay_s: float = 0.0
    max_running: int | None = None  # beyond this, requests wait (for queue tests)
    ready: bool = False
    requests: list[GenerationRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    healthy: bool = True
    _slots: asyncio.Semaphore | None = None
    waiting: int = 0

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.max_running:
            self._slots = asyncio.Semaphore(self.max_running)
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineFailure("fake engine is dead")

    def model_card(self) -> ModelCard:
        return ModelCard(id=MODEL_ID, max_model_len=self.max_model_len, created=0)

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [len(word) for word in text.split()]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def _script(self, request: GenerationRequest, index: int) -> list[str]:
        structured = request.sampling.structured
        if structured is not None:
            return [json.dumps({"city": "Paris"})]
        return [f" w{index}_{i}" for i in range(request.sampling.max_tokens)]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        self.requests.append(request)
        self.active.add(request.request_id)
        try:
            if self._slots is not None:
                self.waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self.waiting -= 1
            try:
                async for delta in self._run(request):
                    yield delta
            finally:
                if self._slots is not None:
                    self._slots.release()
        finally:
            self.active.discard(request.request_id)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        sampling = request.sampling
        scripts = [self._script(request, j) for j in range(sampling.n)]
        texts = ["" for _ in scripts]
        done = [False for _ in scripts]
        emitted = 0
        for step in range(max(len(s) for s in scripts)):
            for j, script in enumerate(scripts):
                if done[j]:
                    continue
                if self.fail_after_tokens is not None and emitted >= self.fail_after_tokens:
                    self.healthy = False
                    raise EngineFailure("fake engine died mid-generation")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                piece = script[step]
                emitted += 1
                texts[j] += piece
                finish = None
                hit = next((s for s in sampling.stop if s in texts[j]), None)
                if hit is not None:
                    piece = piece[: len(piece) - (len(texts[j]) - texts[j].index(hit))]
                    finish = "stop"
                elif step == len(script) - 1:
                    finish = "length" if sampling.structured is None else "stop"
                logprobs = ()
                if sampling.logprobs is not None:
                    top = tuple((f"alt{k}", -1.0 - k) for k in range(sampling.logprobs))
                    logprobs = (TokenLogprob(token=piece, logprob=-0.5, top=top),)
                yield Delta(
                    index=j, text=piece, token_count=1, finish_reason=finish, logprobs=logprobs
                )
                if finish is not None:
                    done[j] = True
            if all(done):
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        waiting = self.waiting
        return EngineStats(running=len(self.active) - waiting, waiting=waiting, kv_cache_usage=0.0)
