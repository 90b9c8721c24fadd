"""Whole-process merge benchmark: mergeserve against mergekit-yaml and the I/O floor, side by side.

    .venv/bin/python benchmarks/merge_bench.py                      # TinyLlama shape, 3 rounds
    .venv/bin/python benchmarks/merge_bench.py --shape qwen-0.5b --sides mergeserve-ray
    .venv/bin/python benchmarks/merge_bench.py --shape mistral-7b --rounds 1 --sides mergekit,mergeserve-ray-fp8 --cleanup

Makes two random bf16 checkpoints of the chosen shape once (cached under .cache/bench), warms
them into the page cache, then runs every side in turn, round after round (interleaved, so drift
hits all sides alike), each as a fresh process: wall time, and peak RSS of the whole process
tree (the process and all its descendants, summed, sampled every 20 ms: for Ray this includes
GCS, raylet and the workers). Reports medians, ratios to mergekit, a Markdown table, JSON and a
PNG chart. The recipe is the Marcoro14 slerp (t gradients filtered on self_attn / mlp) over all
layers of the shape.

Sides: mergekit (mergekit-yaml), mergeserve-local (one process, no Ray), mergeserve-ray (local
Ray, default workers), mergeserve-ray-1w / -2w (1 / 2 workers), mergeserve-ray-fp8 (FP8 out),
io-floor (read both inputs with cat, write an output of the same size with cp). For the Ray
sides, "merged by Ray actors" is the share of the output the actors merged; the driver merges
the rest on its own threads while Ray starts. Run with PYTHONPATH=<repo> to measure a checkout
other than the one installed in the venv (the sides run the venv's `mergeserve` script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from mergeserve.synthetic import SHAPES, make_random_model  # noqa: E402

ALL_SIDES = ["io-floor", "mergekit", "mergeserve-local", "mergeserve-ray", "mergeserve-ray-1w", "mergeserve-ray-2w", "mergeserve-ray-fp8"]
DEFAULT_SIDES = ["io-floor", "mergekit", "mergeserve-local", "mergeserve-ray"]


def recipe(a: Path, b: Path, layers: int) -> dict:
    return {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]}],
        "merge_method": "slerp",
        "base_model": str(a),
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": "bfloat16",
    }


def command(side: str, cfg: Path, a: Path, b: Path, out: Path, shard: str) -> list[str]:
    ms = [str(BIN / "mergeserve"), "merge", str(cfg), str(out), "-q"]
    return {
        "mergekit": [str(BIN / "mergekit-yaml"), str(cfg), str(out), "--out-shard-size", shard, "--quiet"],
        "mergeserve-local": ms + ["--local", "--out-shard-size", shard],
        "mergeserve-ray": ms,
        "mergeserve-ray-1w": ms + ["--workers", "1"],
        "mergeserve-ray-2w": ms + ["--workers", "2"],
        "mergeserve-ray-fp8": ms + ["--out-dtype", "fp8"],
        "io-floor": ["bash", "-c", f"cat {a}/*.safetensors {b}/*.safetensors > /dev/null && cp -r {a} {out}"],
    }[side]


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(cmd: list[str], out: Path) -> tuple[float, int, int, float | None]:
    """(wall seconds, peak RSS of the process tree, peak RSS of one merge worker as reported,
    share of the output merged by Ray actors rather than by the driver while Ray started)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    # mergeserve's summary: "peak memory: worker NAME X.XX GiB" per Ray worker
    text = proc.stdout.read().decode(errors="replace")
    workers = [float(m) for m in re.findall(r"peak memory: worker \S+ ([0-9.]+) GiB", text)]
    wrote = re.search(r"wrote ([0-9.]+) GB", text)
    local = re.search(r"the driver merged \d+ \(([0-9.]+) GB\)", text)
    share = 1 - float(local[1]) / float(wrote[1]) if wrote and local and float(wrote[1]) else None
    return wall, peak, int(max(workers, default=0) * 2**30), share


def warm(*dirs: Path) -> None:
    for d in dirs:
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma list of {ALL_SIDES}")
    ap.add_argument("--shard", default="1B", help="--out-shard-size for mergekit and mergeserve-local")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where JSON/Markdown/PNG go")
    ap.add_argument("--cleanup", action="store_true", help="delete the generated input checkpoints afterwards")
    ap.add_argument("--tag", default="", help="suffix for the result files (merge-SHAPE[-TAG].json/md/png)")
    a = ap.parse_args()
    sides = a.sides.split(",")
    work = Path(a.work)
    shape = SHAPES[a.shape]
    ma, mb = work / f"{a.shape}-a", work / f"{a.shape}-b"
    for d, seed in ((ma, 1), (mb, 2)):
        if not (d / "model.safetensors.index.json").exists():
            print(f"making {d} (random bf16, {a.shape})", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            make_random_model(d, shape, seed=seed, noise_of=ma if d == mb else None)
    cfg = work / f"{a.shape}-slerp.yaml"
    cfg.write_text(yaml.safe_dump(recipe(ma, mb, shape.layers)))
    out = work / "out"
    times: dict[str, list[float]] = {s: [] for s in sides}
    rss: dict[str, list[int]] = {s: [] for s in sides}
    wrss: dict[str, list[int]] = {s: [] for s in sides}
    share: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for s in sides:
            warm(ma, mb)
            w, p, wp, sh = run_one(command(s, cfg, ma, mb, out, a.shard), out)
            times[s].append(w)
            rss[s].append(p)
            wrss[s].append(wp)
            if sh is not None:
                share[s].append(sh)
            extra = f"  peak worker RSS {wp / 2**30:5.2f} GiB" if wp else ""
            extra += f"  merged by Ray actors {sh:4.0%}" if sh is not None else ""
            print(f"round {r + 1}/{a.rounds} {s:22s} {w:7.2f} s  peak tree RSS {p / 2**30:6.2f} GiB{extra}", flush=True)
    res = {
        "shape": a.shape, "rounds": a.rounds, "cpus": os.cpu_count(),
        "sides": {s: {"times": times[s], "peak_rss": rss[s], "median_s": statistics.median(times[s]),
                      "median_peak_rss_gib": statistics.median(rss[s]) / 2**30,
                      "median_peak_worker_rss_gib": statistics.median(wrss[s]) / 2**30,
                      "ray_actor_share": share[s] or None} for s in sides},
    }
    ref = res["sides"].get("mergekit")
    floor = res["sides"].get("io-floor")
    lines = [f"| side ({a.shape}, median of {a.rounds}) | wall s | peak tree RSS GiB | peak worker RSS GiB | speed-up vs mergekit "
             "| RSS vs mergekit | x I/O floor | merged by Ray actors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sides:
        d = res["sides"][s]
        sp = f"{ref['median_s'] / d['median_s']:.2f}x" if ref else "-"
        rr = f"{d['median_peak_rss_gib'] / ref['median_peak_rss_gib']:.2f}" if ref else "-"
        fl = f"{d['median_s'] / floor['median_s']:.2f}" if floor else "-"
        rss_txt = "n/a" if s == "io-floor" else f"{d['median_peak_rss_gib']:.2f}"
        wk = f"{d['median_peak_worker_rss_gib']:.2f}" if d["median_peak_worker_rss_gib"] else "-"
        ra = f"{statistics.median(d['ray_actor_share']):.0%}" if d["ray_actor_share"] else "-"
        lines.append(f"| {s} | {d['median_s']:.2f} | {rss_txt} | {wk} | {sp} | {rr} | {fl} | {ra} |")
    table = "\n".join(lines)
    print(table)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"merge-{a.shape}" + (f"-{a.tag}" if a.tag else "")
    (outdir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (outdir / f"{stem}.md").write_text(table + "\n")
    plot(res, outdir / f"{stem}.png")
    if a.cleanup:
        shutil.rmtree(ma, ignore_errors=True)
        shutil.rmtree(mb, ignore_errors=True)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(res["sides"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in ((ax1, "median_s", "wall time (s)"), (ax2, "median_peak_rss_gib", "peak RSS of process tree (GiB)")):
        vals = [res["sides"][s][key] for s in sides]
        bars = ax.barh(sides, vals, color=["#888" if s == "io-floor" else "#d62" if s == "mergekit" else "#27a" for s in sides])
        ax.bar_label(bars, fmt="%.2f", padding=3)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(f"merge of two {res['shape']}-shape bf16 models (slerp), median of {res['rounds']}, {res['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
