"""Turning runs into figures: per-run summaries, medians over rounds, paired ratios between
targets, capacity against a latency objective, the printed tables and the JSON files.

A run is one target at one load setting in one round. Comparisons pair runs of the same round
(A and B ran back to back under the same conditions), take each round's ratio, and report
the median ratio with its spread, so drift on a noisy machine shows instead of hiding.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.table import Table

from sluice.bench.load import LoadResult

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Objective:
    """A latency objective: requests meet it when TTFT and/or end-to-end latency are within
    the limits given; a setting meets it when the `percentile` of each is within them."""

    latency_s: float | None = None
    ttft_s: float | None = None
    percentile: float = 95

    @property
    def given(self) -> bool:
        return self.latency_s is not None or self.ttft_s is not None

    def met_by(self, summary: dict[str, Any]) -> bool:
        key = f"p{self.percentile:g}"
        checks = [
            (self.latency_s, summary["latency_s"].get(key, math.nan)),
            (self.ttft_s, summary["ttft_s"].get(key, math.nan)),
        ]
        return summary["errors"] == 0 and all(
            limit is None or value <= limit for limit, value in checks
        )

    def __str__(self) -> str:
        parts = [f"latency ≤ {self.latency_s:g} s"] if self.latency_s is not None else []
        parts += [f"TTFT ≤ {self.ttft_s:g} s"] if self.ttft_s is not None else []
        return f"p{self.percentile:g} " + " and ".join(parts)


@dataclass
class Run:
    target: str
    url: str
    setting: float
    label: str
    round: int
    result: LoadResult


def summarise(
    result: LoadResult, objective: Objective, percentiles: Sequence[float]
) -> dict[str, Any]:
    """One run's figures (seconds, per second, counts)."""

    def spread(measure: Callable[[float], float]) -> dict[str, float]:
        return {f"p{q:g}": measure(q) for q in percentiles}

    summary: dict[str, Any] = {
        "requests": len(result.records),
        "ok": len(result.ok),
        "errors": len(result.records) - len(result.ok),
        "errors_by_status": result.errors_by_status(),
        "wall_s": result.wall_s,
        "requests_per_s": result.requests_per_s,
        "input_tokens_per_s": result.input_tokens_per_s,
        "output_tokens_per_s": result.output_tokens_per_s,
        "ttft_s": spread(result.ttft),
        "itl_s": spread(result.itl),
        "latency_s": spread(result.latency),
    }
    if objective.given:
        summary["goodput"] = result.goodput(
            max_latency_s=objective.latency_s, max_ttft_s=objective.ttft_s
        )
    return summary


def finite(value: Any) -> Any:
    """`value` with every NaN replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def median_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Field by field median over rounds (errors are summed, error statuses merged)."""
    first = summaries[0]
    merged: dict[str, Any] = {}
    for key, value in first.items():
        if key in ("requests", "ok", "errors"):
            merged[key] = sum(s[key] for s in summaries)
        elif key == "errors_by_status":
            statuses: dict[str, int] = {}
            for s in summaries:
                for status, count in s[key].items():
                    statuses[status] = statuses.get(status, 0) + count
            merged[key] = statuses
        elif isinstance(value, dict):
            merged[key] = {k: _median([s[key][k] for s in summaries]) for k in value}
        else:
            merged[key] = _median([s[key] for s in summaries])
    merged["rounds"] = len(summaries)
    return merged


@dataclass(frozen=True)
class Ratio:
    """`a` over `b` for one figure: the median of per-round ratios and their range."""

    figure: str
    median: float
    low: float
    high: float


RATIO_FIGURES: tuple[tuple[str, Callable[[dict[str, Any]], float]], ...] = (
    ("output tokens/s", lambda s: s["output_tokens_per_s"]),
    ("requests/s", lambda s: s["requests_per_s"]),
    ("TTFT p50", lambda s: s["ttft_s"]["p50"]),
    ("latency p50", lambda s: s["latency_s"]["p50"]),
    ("latency p95", lambda s: s["latency_s"]["p95"]),
)


def paired_ratios(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> list[Ratio]:
    """Round-by-round ratios a/b (the lists are in round order; unpaired rounds are left out)."""
    ratios = []
    for figure, get in RATIO_FIGURES:
        values = [
            get(x) / get(y)
            for x, y in zip(a, b, strict=False)
            if get(y) and not math.isnan(get(x)) and not math.isnan(get(y))
        ]
        if values:
            ratios.append(Ratio(figure, statistics.median(values), min(values), max(values)))
    return ratios


def capacity(
    by_setting: dict[float, dict[str, Any]], objective: Objective
) -> tuple[float | None, float | None]:
    """The largest setting that meets the objective with every smaller setting meeting it too,
    and the first setting that misses it (None when all meet it)."""
    best = None
    for setting in sorted(by_setting):
        if not objective.met_by(by_setting[setting]):
            return best, setting
        best = setting
    return best, None


def _cell(values: dict[str, float], scale: float = 1.0) -> str:
    return " / ".join("-" if math.isnan(v) else f"{v * scale:.3f}" for v in values.values())


def table(title: str, medians: dict[str, dict[str, Any]]) -> Table:
    """Figures as rows, targets as columns (medians over rounds)."""
    out = Table(title=title)
    out.add_column("metric (median over rounds)")
    for name in medians:
        out.add_column(name, justify="right")
    keys = "/".join(f"p{q:g}" for q in PERCENTILES)
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("requests/s", lambda s: f"{s['requests_per_s']:.2f}"),
        ("input tokens/s", lambda s: f"{s['input_tokens_per_s']:.1f}"),
        ("output tokens/s", lambda s: f"{s['output_tokens_per_s']:.1f}"),
        (f"TTFT s {keys}", lambda s: _cell(s["ttft_s"])),
        (f"inter-token latency s {keys}", lambda s: _cell(s["itl_s"])),
        (f"end-to-end latency s {keys}", lambda s: _cell(s["latency_s"])),
        ("requests ok / sent", lambda s: f"{s['ok']} / {s['requests']}"),
        (
            "errors by status",
            lambda s: (
                ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_status"].items())) or "none"
            ),
        ),
    ]
    if any("goodput" in s for s in medians.values()):
        rows.append(("goodput", lambda s: f"{s.get('goodput', math.nan):.1%}"))
    for name, render in rows:
        out.add_row(name, *(render(s) for s in medians.values()))
    return out


@dataclass
class Report:
    """Everything a bench invocation measured, grouped for printing, plotting and saving."""

    runs: list[Run]
    objective: Objective
    targets: list[str]
    settings: list[float]
    labels: dict[float, str]

    @cached_property
    def summaries(self) -> dict[tuple[str, float], list[dict[str, Any]]]:
        """Each run summarised once, grouped by (target, setting) in round order."""
        grouped: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for run in self.runs:
            summary = summarise(run.result, self.objective, PERCENTILES)
            grouped.setdefault((run.target, run.setting), []).append(summary)
        return grouped

    @cached_property
    def medians(self) -> dict[float, dict[str, dict[str, Any]]]:
        return {
            setting: {
                target: median_summary(self.summaries[target, setting])
                for target in self.targets
                if (target, setting) in self.summaries
            }
            for setting in self.settings
        }

    @cached_property
    def ratios(self) -> dict[float, dict[str, list[Ratio]]]:
        def of(target: str, setting: float) -> list[dict[str, Any]]:
            return self.summaries.get((target, setting), [])

        return {
            setting: {
                f"{a} / {b}": paired_ratios(of(a, setting), of(b, setting))
                for a, b in itertools.combinations(self.targets, 2)
            }
            for setting in self.settings
        }

    @cached_property
    def capacities(self) -> dict[str, tuple[float | None, float | None]]:
        return {
            target: capacity(
                {s: by[target] for s, by in self.medians.items() if target in by}, self.objective
            )
            for target in self.targets
        }

    def write(self, out: Path, meta: dict[str, Any]) -> dict[str, Path]:
        """records.json (every request of every run) and summary.json; returns their paths."""
        out.mkdir(parents=True, exist_ok=True)
        records = out / "records.json"
        records.write_text(
            json.dumps(
                {
                    **meta,
                    "runs": [
                        {
                            "target": run.target,
                            "url": run.url,
                            "setting": run.setting,
                            "load": run.label,
                            "round": run.round,
                            "wall_s": run.result.wall_s,
                            "records": [dataclasses.asdict(r) for r in run.result.records],
                        }
                        for run in self.runs
                    ],
                },
                indent=1,
            )
        )
        summary = out / "summary.json"
        summary.write_text(
            json.dumps(
                finite(
                    {
                        **meta,
                        "objective": dataclasses.asdict(self.objective),
                        "settings": [
                            {
                                "setting": setting,
                                "load": self.labels[setting],
                                "targets": by_target,
                                "ratios": {
                                    pair: [dataclasses.asdict(r) for r in ratios]
                                    for pair, ratios in self.ratios[setting].items()
                                },
                            }
                            for setting, by_target in self.medians.items()
                        ],
                        "capacity": (
                            {
                                target: {"largest_meeting": best, "first_missing": miss}
                                for target, (best, miss) in self.capacities.items()
                            }
                            if self.objective.given
                            else None
                        ),
                    }
                ),
                indent=1,
                allow_nan=False,
            )
        )
        return {"records": records, "summary": summary}
