"""Multi-stage recipe benchmark: mergeserve against mergekit-multi, whole processes, side by side.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/multistage_bench.py                  # TinyLlama shape, 3 rounds
    PYTHONPATH=$PWD .venv/bin/python benchmarks/multistage_bench.py --shape tiny --rounds 1   # a smoke test

Makes three random bf16 checkpoints of the chosen shape once (a, and b and c perturbations of it;
cached under .cache/bench, a and b shared with merge_bench.py), then a two-stage recipe in
mergekit-multi's format: ``pair`` (slerp of a and b, Marcoro14's t gradients) and ``side``
(linear of a and c) share the input a; the unnamed final stage slerps ``pair`` with ``side``.
Every round runs each side in turn as a fresh process (interleaved, so drift hits all sides
alike) with the inputs warmed into the page cache: wall time and peak RSS of the process tree
(Ray's processes included). Reports medians, the ratio to mergekit-multi, and the input bytes
read against the stages merged one by one (what mergekit-multi reads; mergeserve's from its
summary). Writes multistage-SHAPE[-TAG].json and .md to --out.

Sides: mergekit-multi; mergeserve (``mergeserve merge``, the default: one process, independent
stages merged together from shared reads); mergeserve-ray (``--address local``: one Ray job,
embedded Ray's start-up included); mergeserve-local (``--local``: one process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.merge_bench import BIN, recipe, run_sampled, warm  # noqa: E402
from mergeserve.synthetic import SHAPES, make_random_model  # noqa: E402

ALL_SIDES = ["mergekit-multi", "mergeserve", "mergeserve-ray", "mergeserve-local"]
DEFAULT_SIDES = ["mergekit-multi", "mergeserve", "mergeserve-ray"]
# mergeserve's summary line for a multi-stage recipe (merge/stage_run.py, StagesResult.summary)
READ_LINE = re.compile(r"read ([0-9.]+) GB of inputs; the stages one by one would read ([0-9.]+) GB")


def stages(a: Path, b: Path, c: Path, layers: int) -> list[dict]:
    """pair and side share a; the final reads both."""
    pair = {"name": "pair", **recipe(a, b, layers)}
    side = {"name": "side", "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(c), "parameters": {"weight": 0.4}}]}
    final = {"merge_method": "slerp", "base_model": "pair", "dtype": "bfloat16", "parameters": {"t": 0.5},
             "models": [{"model": "pair"}, {"model": "side"}]}
    return [pair, side, final]


def command(side: str, cfg: Path, out: Path, inter: Path, shard: str) -> list[str]:
    ms = [str(BIN / "mergeserve"), "merge", str(cfg), str(out), "-q"]
    return {
        "mergekit-multi": [str(BIN / "mergekit-multi"), str(cfg), "--out-path", str(out), "-I", str(inter),
                           "--out-shard-size", shard, "--quiet"],
        "mergeserve": ms,
        "mergeserve-ray": ms + ["--address", "local"],
        "mergeserve-local": ms + ["--local", "--out-shard-size", shard],
    }[side]


def run_one(cmd: list[str], out: Path, inter: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process tree, stdout) of one whole-process run."""
    for d in (out, inter):
        shutil.rmtree(d, ignore_errors=True)
    wall, tree, text = run_sampled(cmd)
    for d in (out, inter):
        shutil.rmtree(d, ignore_errors=True)
    return wall, tree.peak, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma list of {ALL_SIDES}")
    ap.add_argument("--shard", default="1B", help="--out-shard-size for mergekit-multi and mergeserve-local")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the JSON and Markdown go")
    ap.add_argument("--tag", default="", help="suffix for the result files (multistage-SHAPE[-TAG].json/md)")
    a = ap.parse_args()
    sides = a.sides.split(",")
    unknown = sorted(set(sides) - set(ALL_SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown} (choose from {ALL_SIDES})")
    work = Path(a.work)
    shape = SHAPES[a.shape]
    ma, mb, mc = (work / f"{a.shape}-{x}" for x in "abc")
    for d, seed in ((ma, 1), (mb, 2), (mc, 3)):
        if not (d / "model.safetensors.index.json").exists():
            print(f"making {d} (random bf16, {a.shape})", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            make_random_model(d, shape, seed=seed, noise_of=None if d == ma else ma)
    cfg = work / f"{a.shape}-multistage.yaml"
    cfg.write_text(yaml.safe_dump_all(stages(ma, mb, mc, shape.layers), sort_keys=False))
    out, inter = work / "out-multistage", work / "out-multistage-stages"
    times: dict[str, list[float]] = {s: [] for s in sides}
    rss: dict[str, list[int]] = {s: [] for s in sides}
    reads: dict[str, tuple[float, float]] = {}
    for r in range(a.rounds):
        for s in sides:
            warm(ma, mb, mc)
            wall, peak, text = run_one(command(s, cfg, out, inter, a.shard), out, inter)
            times[s].append(wall)
            rss[s].append(peak)
            if m := READ_LINE.search(text):
                reads[s] = (float(m[1]), float(m[2]))
            print(f"round {r + 1}/{a.rounds} {s:18s} {wall:7.2f} s  peak tree RSS {peak / 2**30:6.2f} GiB", flush=True)
    one_by_one = next((v[1] for v in reads.values()), None)
    res = {
        "shape": a.shape, "rounds": a.rounds, "cpus": os.cpu_count(), "recipe": cfg.read_text(),
        "gb_read_one_by_one": one_by_one,
        "sides": {s: {"times": times[s], "peak_rss": rss[s], "median_s": statistics.median(times[s]),
                      "median_peak_rss_gib": statistics.median(rss[s]) / 2**30,
                      # mergekit-multi merges stage after stage: it reads what the stages one by one read
                      "gb_read": reads[s][0] if s in reads else (one_by_one if s == "mergekit-multi" else None)}
                  for s in sides},
    }
    table = markdown(res, sides)
    print(table)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"multistage-{a.shape}" + (f"-{a.tag}" if a.tag else "")
    (outdir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (outdir / f"{stem}.md").write_text(table + "\n")


def markdown(res: dict, sides: list[str]) -> str:
    ref = res["sides"].get("mergekit-multi")
    lines = [f"| side ({res['shape']}, two stages sharing an input + final, median of {res['rounds']}) | wall s "
             "| speed-up vs mergekit-multi | peak tree RSS GiB | GB of inputs read (stages one by one: "
             f"{res['gb_read_one_by_one'] if res['gb_read_one_by_one'] is not None else '?'}) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for s in sides:
        d = res["sides"][s]
        sp = f"{ref['median_s'] / d['median_s']:.2f}x" if ref else "-"
        gb = f"{d['gb_read']:.2f}" if d["gb_read"] is not None else "-"
        lines.append(f"| {s} | {d['median_s']:.2f} | {sp} | {d['median_peak_rss_gib']:.2f} | {gb} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
