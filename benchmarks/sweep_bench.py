"""Merge-sweep benchmark: whole processes, side by side in one run.

    .venv/bin/python benchmarks/sweep_bench.py --part write     # 16-variant t-sweep, TinyLlama shape, to disk
    .venv/bin/python benchmarks/sweep_bench.py --part scores    # 16 variants scored in memory, tiny family

``write``: two random bf16 TinyLlama-shape checkpoints (shared with merge_bench.py, cached under
.cache/bench); 16 values of slerp ``t``. Sides: ``mergeserve sweep`` writing 16 bf16 checkpoints
(embedded Ray, Ray's start-up included); 16 sequential ``mergekit-yaml`` runs (one per value);
the copy floor, 16 plain copies of an input checkpoint (writing 16 outputs of the same size).
Reports wall time, peak RSS of the process tree, and the sweep's source bytes read against the
16 one-by-one merges' (from its results.json).

``scores``: the tiny family; a 16-variant scores-only sweep (nothing written, both held-out texts
evaluated) against a one-variant sweep that writes its checkpoint and evaluates it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.merge_bench import BIN, run_one, warm  # noqa: E402
from mergeserve.synthetic import SHAPES, make_random_model  # noqa: E402

TS = [round(i / 15, 4) for i in range(16)]


def slerp_recipe(a: Path, b: Path, layers: int, t) -> dict:
    return {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]}],
        "merge_method": "slerp", "base_model": str(a), "parameters": {"t": t}, "dtype": "bfloat16",
    }


def _timed(cmd: list[str], out: Path, keep: bool = False) -> tuple[float, int, str]:
    """run_one, but keeping OUT's results.json (read before it is removed)."""
    from benchmarks.merge_bench import run_sampled

    shutil.rmtree(out, ignore_errors=True)
    wall, tree, _ = run_sampled(cmd)
    summary = (out / "results.json").read_text() if (out / "results.json").exists() else "{}"
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return wall, tree.peak, summary


def part_write(work: Path, rounds: int) -> dict:
    shape = SHAPES["tinyllama"]
    ma, mb = work / "tinyllama-a", work / "tinyllama-b"
    for d, seed in ((ma, 1), (mb, 2)):
        if not (d / "model.safetensors.index.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            make_random_model(d, shape, seed=seed, noise_of=ma if d == mb else None)
    spec = {"recipe": slerp_recipe(ma, mb, shape.layers, 0.5), "axes": [{"path": "parameters.t", "name": "t", "values": TS}],
            "batch_size": 8, "output": "bfloat16"}
    (work / "sweep16.yaml").write_text(yaml.safe_dump(spec))
    cfgs = []
    for i, t in enumerate(TS):
        c = work / f"mk-{i:02d}.yaml"
        c.write_text(yaml.safe_dump(slerp_recipe(ma, mb, shape.layers, t)))
        cfgs.append(c)
    out = work / "sweep-out"
    res: dict = {"sweep": [], "mergekit-x16": [], "copy-floor-x16": [], "sweep_rss": [], "mergekit_rss": [], "read": None}
    for r in range(rounds):
        warm(ma, mb)
        w, p, summary = _timed([str(BIN / "mergeserve"), "sweep", str(work / "sweep16.yaml"), str(out), "-q"], out)
        s = json.loads(summary)
        res["read"] = {"bytes_read": s["bytes_read"], "bytes_read_naive": s["bytes_read_naive"], "read_ratio": s["read_ratio"]}
        res["sweep"].append(w)
        res["sweep_rss"].append(p)
        print(f"round {r + 1}: mergeserve sweep (16 checkpoints) {w:.1f} s, peak tree RSS {p / 2**30:.2f} GiB, "
              f"read ratio {s['read_ratio']}", flush=True)
        warm(ma, mb)
        t0, peak = time.perf_counter(), 0
        for c in cfgs:
            p = run_one([str(BIN / "mergekit-yaml"), str(c), str(work / "mk-out"), "--quiet"], work / "mk-out")["peak_rss"]
            peak = max(peak, p)
        res["mergekit-x16"].append(time.perf_counter() - t0)
        res["mergekit_rss"].append(peak)
        print(f"round {r + 1}: 16 x mergekit-yaml {res['mergekit-x16'][-1]:.1f} s", flush=True)
        t0 = time.perf_counter()
        for i in range(16):
            shutil.copytree(ma, work / "copies" / f"c{i:02d}")
        import os

        os.sync()
        res["copy-floor-x16"].append(time.perf_counter() - t0)
        shutil.rmtree(work / "copies", ignore_errors=True)
        print(f"round {r + 1}: 16 plain copies {res['copy-floor-x16'][-1]:.1f} s", flush=True)
    med = {k: statistics.median(res[k]) for k in ("sweep", "mergekit-x16", "copy-floor-x16")}
    res["median"] = med
    res["speedup_vs_mergekit"] = med["mergekit-x16"] / med["sweep"]
    res["x_copy_floor"] = med["sweep"] / med["copy-floor-x16"]
    return res


def part_scores(work: Path, rounds: int, tiny: Path) -> dict:
    recipe = {
        "slices": [{"sources": [{"model": "mistral-code", "layer_range": [0, 4]}, {"model": "mistral-prose", "layer_range": [0, 4]}]}],
        "merge_method": "slerp", "base_model": "mistral-code", "parameters": {"t": 0.5}, "dtype": "bfloat16",
    }
    ev = {"texts": {d: str(tiny / "heldout" / f"{d}.txt") for d in ("code", "prose")}}
    many = {"recipe": recipe, "models_dir": str(tiny), "axes": [{"path": "parameters.t", "name": "t", "values": TS}],
            "batch_size": 16, "output": "none", "eval": ev}
    one = {**many, "axes": [{"path": "parameters.t", "name": "t", "values": [0.5]}], "output": "bfloat16"}
    (work / "scores16.yaml").write_text(yaml.safe_dump(many))
    (work / "one.yaml").write_text(yaml.safe_dump(one))
    res: dict = {"scores-only-x16": [], "one-written-and-evaluated": []}
    for r in range(rounds):
        for side, spec in (("scores-only-x16", "scores16.yaml"), ("one-written-and-evaluated", "one.yaml")):
            w, _, _ = _timed([str(BIN / "mergeserve"), "sweep", str(work / spec), str(work / "scores-out"), "-q"], work / "scores-out")
            res[side].append(w)
            print(f"round {r + 1}: {side} {w:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    res["median"] = med
    res["ratio"] = med["scores-only-x16"] / med["one-written-and-evaluated"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["write", "scores"], required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench"))
    ap.add_argument("--tiny", default=str(REPO / ".cache" / "tiny-family"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = part_write(work, a.rounds) if a.part == "write" else part_scores(work, a.rounds, Path(a.tiny).absolute())
    res["rounds"] = a.rounds
    print(json.dumps({k: v for k, v in res.items() if k in ("median", "speedup_vs_mergekit", "x_copy_floor", "ratio", "read")}, indent=2))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"sweep-{a.part}.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
