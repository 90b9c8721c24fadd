"""PNG plots of a load test (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(runs, path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E latency: one line per model (and load point)."""
    plt = _plt()
    several_points = len({r.point for r in runs}) > 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (name, values_of) in zip(axes.flat, (
        ("TTFT", lambda recs: [r.ttft for r in recs if r.ok and r.ttft is not None]),
        ("TPOT", lambda recs: [r.tpot for r in recs if r.ok and r.tpot is not None]),
        ("ITL", lambda recs: [g for r in recs if r.ok for g in r.itls]),
        ("E2E latency", lambda recs: [r.e2e for r in recs if r.ok and r.e2e is not None]),
    )):
        for run in runs:
            ms = np.sort(np.asarray(values_of(run.records), dtype=float)) * 1000
            if ms.size == 0:
                continue
            label = f"{run.model} @ {run.point.label}" if several_points else run.model
            ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(runs, path: Path) -> Path:
    """Throughput and latency against the swept rate or concurrency, one line per model."""
    plt = _plt()
    mode = runs[0].point.mode
    xlabel = "request rate (req/s)" if mode == "rate" else "concurrency"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ci, model in enumerate(dict.fromkeys(r.model for r in runs)):
        c = f"C{ci % 10}"  # one colour per model; line style and marker tell the series apart
        mine = sorted((r for r in runs if r.model == model), key=lambda r: r.point.value)
        x = [r.point.value for r in mine]
        finite = [v for v in x if math.isfinite(v)]
        x = [v if math.isfinite(v) else (max(finite, default=1) * 2) for v in x]  # plot 'inf' past the largest rate
        m = [r.metrics for r in mine]
        axes[0].plot(x, [v.output_throughput for v in m], "o-", color=c, label=model)
        axes[1].plot(x, [v.request_throughput for v in m], "o-", color=c, label=model)
        if any(v.goodput is not None for v in m):
            axes[1].plot(x, [v.goodput or 0 for v in m], "x--", color=c, label=f"{model} goodput")
        for key, style in (("ttft", "-"), ("tpot", ":")):
            for stat, marker in (("p50", "o"), ("p99", "^")):
                axes[2].plot(x, [getattr(v, f"{key}_ms")[stat] or np.nan for v in m], marker + style,
                             color=c, label=f"{model} {key.upper()} {stat}")
    for ax, title, ylabel in zip(axes, ("Output throughput", "Request throughput", "Latency"),
                                 ("output tokens/s", "requests/s", "ms")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
