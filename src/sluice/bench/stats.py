"""Statistics for latency samples: percentiles with linear interpolation (numpy's default)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`; NaN when there are none."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def inter_token_latencies(arrivals: Sequence[float]) -> list[float]:
    """Gaps between consecutive token arrivals (the first token's wait is TTFT, not ITL)."""
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]
