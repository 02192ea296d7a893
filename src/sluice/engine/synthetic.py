"""`SyntheticEngine`: a load-testing engine that emits tokens at a set rate, with no model.

Never the default; chosen with `sluice serve --engine synthetic`. It exists to measure the
gateway alone (HTTP, validation, SSE framing, metrics, tracing) at token rates a CPU-bound
model cannot reach. Its output is meaningless filler. Each sequence makes
`synthetic_tokens_per_s` tokens per second up to `max_tokens` (stop strings are honoured);
a consumer that lags gets every token made since its last pull in one delta, as vLLM's
output collector does; `max_num_seqs`, when set, caps concurrent sequences and the rest
wait, as in a real engine. Tokenisation is one token per whitespace-separated word.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncGenerator, Sequence

from sluice.config import Settings
from sluice.engine.protocol import Delta, EngineStats, FinishReason, GenerationRequest, ModelCard

DEFAULT_CONTEXT = 8192
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


class SyntheticEngine:
    """Engine protocol implementation that generates filler text on a timer."""

    def __init__(self, settings: Settings) -> None:
        options = settings.engine
        self.tokens_per_s = options.synthetic_tokens_per_s
        self.card = ModelCard(
            id=settings.served_model_name or "synthetic",
            max_model_len=options.max_model_len or DEFAULT_CONTEXT,
            created=int(time.time()),
            owned_by="sluice-synthetic",
        )
        self._slots = asyncio.Semaphore(options.max_num_seqs) if options.max_num_seqs else None
        self._running = 0
        self._waiting = 0
        self._aborted: set[str] = set()
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    async def check_health(self) -> None:
        return None

    def model_card(self) -> ModelCard:
        return self.card

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [zlib.crc32(word.encode()) % 50_000 for word in text.split()]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        turns = "".join(f"<|{m['role']}|> {m['content']} " for m in messages)
        return turns + "<|assistant|>"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if self._slots is not None:
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        self._running += request.sampling.n
        try:
            async for delta in self._emit(request):
                yield delta
        finally:
            self._running -= request.sampling.n
            self._aborted.discard(request.request_id)
            if self._slots is not None:
                self._slots.release()

    async def _emit(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Tokens are made on the clock whether or not the consumer took the last ones; each
        pull returns every token made since the previous pull, one `Delta` per choice (as
        vLLM's per-request output collector merges deltas for a consumer that lags)."""
        sampling = request.sampling
        rate = self.tokens_per_s
        texts = ["" for _ in range(sampling.n)]
        done = [False for _ in range(sampling.n)]
        started = time.monotonic()
        made = 0
        while made < sampling.max_tokens:
            due = min(sampling.max_tokens, int((time.monotonic() - started) * rate))
            if due <= made:
                # Sleep to the schedule, not by a fixed amount, so timer overhead cannot drift.
                await asyncio.sleep(max(0.0, started + (made + 1) / rate - time.monotonic()))
                continue
            if request.request_id in self._aborted:
                return
            last = due == sampling.max_tokens
            for index in range(sampling.n):
                if done[index]:
                    continue
                pieces = []
                for step in range(made, due):
                    piece = " " + WORDS[(step + index) % len(WORDS)]
                    texts[index] += piece
                    hit = next((s for s in sampling.stop if s in texts[index]), None)
                    if hit is not None:
                        cut = len(texts[index]) - texts[index].index(hit)
                        pieces.append(piece[: max(0, len(piece) - cut)])
                        done[index] = True
                        break
                    pieces.append(piece)
                reason: FinishReason | None = (
                    "stop" if done[index] else ("length" if last else None)
                )
                yield Delta(index, "".join(pieces), len(pieces), reason)
            made = due
            if all(done):
                return

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=self._waiting, kv_cache_usage=0.0)
