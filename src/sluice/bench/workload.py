"""What a benchmark sends and when: request shapes drawn from length distributions, and
arrival schedules (a fixed concurrency, or an open-loop rate that is Poisson or bursty).

Everything is drawn up front from one seeded generator, so every target of a comparison and
every round gets the very same requests at the very same offsets.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

FILLER = "the quick brown fox jumps over the lazy dog and keeps running through the field"


class WorkloadError(ValueError):
    """A workload description that cannot be used; `str(exc)` is one sentence for the user."""


@dataclass(frozen=True)
class Lengths:
    """A length distribution: `fixed:N` (or just `N`) or `uniform:LOW:HIGH` (inclusive)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, *, what: str) -> Lengths:
        kind, _, rest = text.partition(":")
        try:
            if not rest and kind.isdigit():
                low = high = int(kind)
            elif kind == "fixed":
                low = high = int(rest)
            elif kind == "uniform":
                first, second = rest.split(":")
                low, high = int(first), int(second)
            else:
                raise ValueError
        except ValueError:
            raise WorkloadError(
                f"{what} must be N, fixed:N or uniform:LOW:HIGH (got {text!r})."
            ) from None
        if low < 1 or high < low:
            raise WorkloadError(f"{what} needs 1 <= LOW <= HIGH (got {text!r}).")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"uniform {self.low}-{self.high}"


@dataclass(frozen=True)
class Shape:
    """One request's prompt and output budget."""

    prompt: str
    max_tokens: int


def filler(words: int, offset: int = 0) -> str:
    """`words` filler words; `offset` rotates them so prompts do not share a prefix."""
    vocab = FILLER.split()
    return " ".join(vocab[(offset + i) % len(vocab)] for i in range(words))


def read_prompts(path: Path) -> list[tuple[str, int | None]]:
    """(prompt, max_tokens or None) from a JSONL file with `prompt` and optional `max_tokens`."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise WorkloadError(f"Cannot read {path}: {exc.strerror}.") from None
    prompts: list[tuple[str, int | None]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
            max_tokens = row.get("max_tokens")
            if not isinstance(prompt, str) or not (
                max_tokens is None or (isinstance(max_tokens, int) and max_tokens >= 1)
            ):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise WorkloadError(
                f"{path} line {number} is not a JSON object with a string 'prompt' "
                "(and optionally a positive integer 'max_tokens')."
            ) from None
        prompts.append((prompt, max_tokens))
    if not prompts:
        raise WorkloadError(f"{path} holds no prompts.")
    return prompts


def shapes(
    count: int,
    *,
    prompt_words: Lengths,
    output_tokens: Lengths,
    prompts_file: Path | None = None,
    seed: int = 0,
) -> list[Shape]:
    """`count` request shapes. Prompts come from the file in order (cycling) when one is given,
    else are filler of `prompt_words` words; a line's own `max_tokens` wins over the draw."""
    rng = random.Random(seed)
    rows = read_prompts(prompts_file) if prompts_file is not None else None
    drawn = []
    for index in range(count):
        if rows is not None:
            prompt, own_max = rows[index % len(rows)]
        else:
            prompt, own_max = filler(prompt_words.draw(rng), offset=index), None
        drawn.append(Shape(prompt, own_max or output_tokens.draw(rng)))
    return drawn


@dataclass(frozen=True)
class Arrival:
    """How requests arrive: `concurrency` in flight at all times (closed loop), or an open loop
    at `rate` requests/s with gamma-distributed gaps (`burstiness` 1 is Poisson; below 1 the
    gaps are burstier, above 1 more regular), optionally capped at `concurrency` in flight."""

    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise WorkloadError("Give a concurrency or a request rate.")
        if self.concurrency is not None and self.concurrency < 1:
            raise WorkloadError("Concurrency must be at least 1.")
        if self.rate is not None and self.rate <= 0:
            raise WorkloadError("The request rate must be above 0.")
        if self.burstiness <= 0:
            raise WorkloadError("Burstiness must be above 0.")

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        kind = "Poisson" if self.burstiness == 1 else f"bursty {self.burstiness:g}"
        cap = f", at most {self.concurrency} in flight" if self.concurrency else ""
        return f"{self.rate:g} req/s {kind}{cap}"

    @property
    def setting(self) -> float:
        """The swept number: the rate in open loop, else the concurrency."""
        return self.rate if self.rate is not None else float(self.concurrency or 0)

    def offsets(self, count: int, seed: int = 0) -> list[float]:
        """Send times in seconds from the start (all 0 in closed loop)."""
        if self.rate is None:
            return [0.0] * count
        rng = random.Random(seed)
        shape = self.burstiness
        scale = 1.0 / (self.rate * shape)  # mean gap 1/rate whatever the shape
        at, times = 0.0, []
        for _ in range(count):
            times.append(at)
            at += rng.gammavariate(shape, scale)
        return times
