"""PNG plots of a bench report (matplotlib, drawn off-screen with the Agg backend).

- `latency.png`: the distributions (empirical CDFs) of TTFT, inter-token latency and
  end-to-end latency, one line per target and load setting, all rounds pooled.
- `sweep.png` (two or more settings): output tokens/s and p95 (the capacity percentile)
  end-to-end latency, and TTFT when it has an objective, against the setting, one line per
  target, with the objectives drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from sluice.bench.load import RequestRecord
from sluice.bench.report import Report
from sluice.bench.stats import inter_token_latencies

STYLES = ("-", "--", ":", "-.")


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def latency_plot(report: Report, path: Path) -> Path:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels: tuple[tuple[str, Callable[[RequestRecord], list[float]]], ...] = (
        ("time to first token (s)", lambda r: [r.ttft] if r.ttft is not None else []),
        ("inter-token latency (s)", lambda r: inter_token_latencies(r.chunk_times)),
        ("end-to-end latency (s)", lambda r: [r.latency]),
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, values_of) in zip(axes, panels, strict=True):
        for t, target in enumerate(report.targets):
            for s, setting in enumerate(report.settings):
                values = [
                    value
                    for run in report.runs
                    if run.target == target and run.setting == setting
                    for record in run.result.ok
                    for value in values_of(record)
                ]
                if not values:
                    continue
                xs, ys = _cdf(values)
                axis.step(
                    xs,
                    ys,
                    where="post",
                    color=colours[t % len(colours)],
                    linestyle=STYLES[s % len(STYLES)],
                    label=f"{target}, {report.labels[setting]}",
                )
        axis.set_xlabel(title)
        axis.set_ylabel("share of requests")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle("latency distributions (all rounds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def sweep_plot(report: Report, path: Path, *, axis_name: str) -> Path:
    medians = report.medians
    objective = report.objective
    key = f"p{objective.percentile:g}"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target in report.targets:
        settings = [s for s in report.settings if target in medians[s]]
        by = [medians[s][target] for s in settings]
        left.plot(settings, [m["output_tokens_per_s"] for m in by], marker="o", label=target)
        line = right.plot(
            settings, [m["latency_s"][key] for m in by], marker="o", label=f"{target} latency"
        )
        if objective.ttft_s is not None:
            right.plot(
                settings,
                [m["ttft_s"][key] for m in by],
                marker="s",
                linestyle="--",
                color=line[0].get_color(),
                label=f"{target} TTFT",
            )
    for limit, name in ((objective.latency_s, "latency"), (objective.ttft_s, "TTFT")):
        if limit is not None:
            right.axhline(limit, color="grey", linestyle=":", label=f"{name} objective")
    for axis, label in ((left, "output tokens/s"), (right, f"{key} latency (s)")):
        axis.set_xlabel(axis_name)
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(report.settings, [f"{s:g}" for s in report.settings])
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"throughput and {key} latency against {axis_name} (median over rounds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
