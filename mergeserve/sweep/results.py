"""Sweep results: the ranking table (terminal, CSV, JSON), the Pareto set and the plots.

A result row is a dict: ``name``, ``label``, ``values`` ({axis: value}), ``scores``
({text: {ppl_token, ppl_byte, bits_per_byte, nll, tokens, bytes}}), ``checkpoint`` (or None),
``duplicate_of``. Every objective is minimised: a text's token perplexity, and ``mean``, the
geometric mean of the token perplexities over all texts.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def texts_of(rows: Sequence[dict]) -> list[str]:
    for r in rows:
        if r.get("scores"):
            return list(r["scores"])
    return []


def mean_ppl(row: dict) -> float:
    s = row.get("scores") or {}
    if not s:
        return math.nan
    return math.exp(sum(math.log(v["ppl_token"]) for v in s.values()) / len(s))


def pareto_front(rows: Sequence[dict]) -> list[str]:
    """Names of the variants no other variant beats on every text (token perplexity)."""
    texts = texts_of(rows)
    scored = [r for r in rows if r.get("scores") and not r.get("duplicate_of")]
    vec = {r["name"]: [r["scores"][t]["ppl_token"] for t in texts] for r in scored}
    front = []
    for a, va in vec.items():
        dominated = any(all(x <= y for x, y in zip(vb, va)) and any(x < y for x, y in zip(vb, va)) for b, vb in vec.items() if b != a)
        if not dominated:
            front.append(a)
    return front


def best_by_objective(rows: Sequence[dict]) -> dict[str, dict]:
    """{objective: {name, label, value}} for every text and for 'mean'."""
    scored = [r for r in rows if r.get("scores")]
    out = {}
    for t in texts_of(rows):
        r = min(scored, key=lambda r: r["scores"][t]["ppl_token"])
        out[t] = {"name": r["name"], "label": r["label"], "ppl_token": r["scores"][t]["ppl_token"]}
    if scored:
        r = min(scored, key=mean_ppl)
        out["mean"] = {"name": r["name"], "label": r["label"], "ppl_token": mean_ppl(r)}
    return out


def rank(rows: Sequence[dict], objective: str = "mean") -> list[dict]:
    """Rows, best first, by ``objective`` (a text name or 'mean'); unscored rows last."""
    def key(r):
        if not r.get("scores"):
            return math.inf
        return mean_ppl(r) if objective == "mean" else r["scores"][objective]["ppl_token"]

    return sorted(rows, key=key)


def table(rows: Sequence[dict], axes: Sequence[str]) -> str:
    """A plain-text table, best mean first; '*' marks the Pareto set."""
    texts = texts_of(rows)
    front = set(pareto_front(rows))
    head = ["variant", *axes, *(f"{t} ppl/tok" for t in texts), *(f"{t} ppl/byte" for t in texts), "mean ppl", "pareto"]
    body = []
    for r in rank(rows):
        s = r.get("scores") or {}
        cells = [r["name"] + (f" (= {r['duplicate_of']})" if r.get("duplicate_of") else "")]
        cells += [_fmt(r["values"].get(a)) for a in axes]
        cells += [f"{s[t]['ppl_token']:.3f}" if t in s else "-" for t in texts]
        cells += [f"{s[t]['ppl_byte']:.4f}" if t in s else "-" for t in texts]
        cells += [f"{mean_ppl(r):.3f}" if s else "-", "*" if r["name"] in front else ""]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return "" if v is None else str(v)


def write_csv(path: Path, rows: Sequence[dict], axes: Sequence[str]) -> None:
    texts = texts_of(rows)
    front = set(pareto_front(rows))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", *axes, *(f"{t}_{k}" for t in texts for k in ("ppl_token", "ppl_byte", "bits_per_byte")),
                    "mean_ppl_token", "pareto", "duplicate_of", "checkpoint"])
        for r in rank(rows):
            s = r.get("scores") or {}
            w.writerow([
                r["name"], r["label"], *(_fmt(r["values"].get(a)) for a in axes),
                *(s[t][k] if t in s else "" for t in texts for k in ("ppl_token", "ppl_byte", "bits_per_byte")),
                mean_ppl(r) if s else "", r["name"] in front, r.get("duplicate_of") or "", r.get("checkpoint") or "",
            ])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(out: Path, rows: Sequence[dict], axes: Sequence[str]) -> list[Path]:
    """pareto.png (token perplexity on text A vs text B, Pareto set joined) and, when an axis is
    numeric, tradeoff.png (each text's perplexity along the first numeric axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = texts_of(rows)
    scored = [r for r in rows if r.get("scores") and not r.get("duplicate_of")]
    made = []
    if len(texts) >= 2 and scored:
        pairs = [(texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))][:6]
        fig, axs = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 5), squeeze=False)
        front = set(pareto_front(rows))
        for ax, (a, b) in zip(axs[0], pairs):
            xs = [r["scores"][a]["ppl_token"] for r in scored]
            ys = [r["scores"][b]["ppl_token"] for r in scored]
            ax.scatter(xs, ys, c=["tab:red" if r["name"] in front else "tab:gray" for r in scored], zorder=3)
            pf = sorted((r["scores"][a]["ppl_token"], r["scores"][b]["ppl_token"]) for r in scored if r["name"] in front)
            ax.plot([p[0] for p in pf], [p[1] for p in pf], "r--", lw=1, label="Pareto set")
            for r, x, y in zip(scored, xs, ys):
                ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"{a}: perplexity per token (lower is better)")
            ax.set_ylabel(f"{b}: perplexity per token")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle(f"Merge sweep: {len(scored)} variants")
        made.append(_save(fig, out / "pareto.png"))
    numeric = [a for a in axes if all(isinstance(r["values"].get(a), (int, float)) and not isinstance(r["values"].get(a), bool) for r in scored)]
    if numeric and texts and scored:
        x_axis = numeric[0]
        others = [a for a in axes if a != x_axis]
        fig, axs = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.5), squeeze=False)
        for ax, t in zip(axs[0], texts):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in scored:
                key = ", ".join(f"{o}={_fmt(r['values'].get(o))}" for o in others) or t
                series.setdefault(key, []).append((r["values"][x_axis], r["scores"][t]["ppl_token"]))
            for key, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key if others else None)
            ax.set_xlabel(x_axis)
            ax.set_ylabel("perplexity per token")
            ax.set_title(t)
            ax.grid(alpha=0.3)
            if others and len(series) <= 10:
                ax.legend(fontsize=7)
        fig.suptitle(f"Trade-off along {x_axis}")
        made.append(_save(fig, out / "tradeoff.png"))
    return made


def write_report(out: Path, rows: Sequence[dict], axes: Sequence[str], extra: dict | None = None) -> dict:
    """results.csv, results.json and the plots; returns the JSON summary."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows, axes)
    summary = {
        "variants": len(rows),
        "unique": sum(1 for r in rows if not r.get("duplicate_of")),
        "best": best_by_objective(rows),
        "pareto": pareto_front(rows),
        **(extra or {}),
        "results": rank(rows),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["plots"] = [str(p) for p in plot(out, rows, axes)]
    return summary
