"""The side-by-side report: a terminal table, JSON, CSV, per-request CSV and PNG plots.

Files written by :meth:`LoadTestReport.write` into the output directory:

- ``loadtest.json``: the run's settings and every run's metrics (one per model and load point);
- ``loadtest.csv``: the same metrics, one row per model and load point;
- ``requests.csv``: every measured request (times in ms, token counts, error kind);
- ``latency_cdf.png``: TTFT, TPOT, ITL and E2E latency CDFs, one line per model (per load point
  when there are several);
- ``sweep.png`` (sweeps only): output tokens/s, requests/s and TTFT/TPOT p50 and p99 against the
  swept rate or concurrency, one line per model.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mergeserve.loadtest.metrics import LATENCIES, STATS, Metrics, RequestRecord


@dataclass(frozen=True)
class LoadPoint:
    """One load setting: ``concurrency`` N workers, or ``rate`` R requests/s (capped at ``max_concurrency``)."""

    mode: str
    value: float
    max_concurrency: int | None = None

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency={int(self.value)}"
        cap = f",max-concurrency={self.max_concurrency}" if self.max_concurrency else ""
        return f"rate={'inf' if math.isinf(self.value) else f'{self.value:g}'}/s{cap}"


@dataclass
class RunResult:
    model: str
    point: LoadPoint
    metrics: Metrics
    records: list[RequestRecord] = field(repr=False, default_factory=list)
    cancelled: int = 0  # requests in flight when the run was interrupted (not in the metrics)

    def to_dict(self) -> dict:
        return {"model": self.model, "load": self.point.label, "mode": self.point.mode,
                "value": self.point.value if math.isfinite(self.point.value) else "inf",
                "max_concurrency": self.point.max_concurrency, "cancelled": self.cancelled, **self.metrics.to_dict()}


@dataclass
class LoadTestReport:
    config: dict
    runs: list[RunResult] = field(default_factory=list)
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)  # what write() wrote, by kind

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.runs))

    def metrics(self, model: str, point: int = 0) -> Metrics:
        """The metrics of ``model`` at the ``point``-th load point (0: the only one, unless sweeping)."""
        return [r for r in self.runs if r.model == model][point].metrics

    def to_dict(self) -> dict:
        return {"config": self.config, "interrupted": self.interrupted, "runs": [r.to_dict() for r in self.runs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def rows(self) -> list[dict]:
        """Flat rows (one per model and load point) for CSV."""
        out = []
        for r in self.runs:
            d = r.to_dict()
            row = {k: v for k, v in d.items() if not isinstance(v, dict)}
            for lat in LATENCIES:
                for s in STATS:
                    row[f"{lat}_{s}_ms"] = d[f"{lat}_ms"][s]
            row["errors"] = ";".join(f"{k}={v}" for k, v in d["errors"].items())
            out.append(row)
        return out

    def to_csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()

    def table(self) -> str:
        """Models side by side (columns), one block per load point."""
        lines = []
        for label in dict.fromkeys(r.point.label for r in self.runs):
            runs = [r for r in self.runs if r.point.label == label]
            rows = [("requests ok/failed", [f"{r.metrics.completed}/{r.metrics.failed}" for r in runs]),
                    ("duration s", [f"{r.metrics.duration_s:.2f}" for r in runs]),
                    ("requests/s", [f"{r.metrics.request_throughput:.2f}" for r in runs]),
                    ("output tok/s", [f"{r.metrics.output_throughput:.1f}" for r in runs])]
            if any(r.metrics.goodput is not None for r in runs):
                rows.append((f"goodput req/s ({runs[0].metrics.slo})", [_num(r.metrics.goodput, 2) for r in runs]))
            for lat in LATENCIES:
                for s in STATS:
                    rows.append((f"{lat.upper()} {s} ms", [_num(getattr(r.metrics, f'{lat}_ms')[s], 1) for r in runs]))
            rows.append(("errors", [", ".join(f"{k} {v}" for k, v in r.metrics.errors.items()) or "-" for r in runs]))
            names = [r.model for r in runs]
            w0 = max(len(k) for k, _ in rows)
            ws = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
            lines.append(f"load: {label}" + ("  (interrupted: partial results)" if self.interrupted else ""))
            lines.append("  ".join([" " * w0, *(n.rjust(w) for n, w in zip(names, ws))]))
            lines += ["  ".join([k.ljust(w0), *(x.rjust(w) for x, w in zip(v, ws))]) for k, v in rows]
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write JSON, CSV, per-request CSV and PNG plots; returns their paths by kind."""
        from mergeserve.loadtest.plots import plot_cdfs, plot_sweep

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "loadtest.json", "csv": out / "loadtest.csv", "requests": out / "requests.csv"}
        paths["json"].write_text(self.to_json() + "\n")
        paths["csv"].write_text(self.to_csv())
        with open(paths["requests"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "load", "index", "sent_s", "ttft_ms", "tpot_ms", "e2e_ms", "content_chunks",
                        "prompt_tokens", "output_tokens", "error", "detail"])
            for r in self.runs:
                t0 = min((x.sent for x in r.records), default=0.0)
                for x in r.records:
                    w.writerow([r.model, r.point.label, x.index, f"{x.sent - t0:.4f}", _ms(x.ttft), _ms(x.tpot), _ms(x.e2e),
                                len(x.chunk_times), x.prompt_tokens, x.output_tokens, x.error or "", x.detail])
        if any(r.metrics.completed for r in self.runs):
            paths["latency_cdf"] = plot_cdfs(self.runs, out / "latency_cdf.png")
        if len({r.point for r in self.runs}) > 1:
            paths["sweep"] = plot_sweep(self.runs, out / "sweep.png")
        return paths


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v) -> str:
    return "" if v is None else f"{v * 1000:.3f}"
