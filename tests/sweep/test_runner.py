"""Merge sweeps on a real 3-node Ray cluster over the tiny family: the slerp t trade-off curve,
shared reads, checkpoints equal to lone merges bit for bit, de-duplication, resume, adaptive search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mergeserve.errors import OutputExistsError
from mergeserve.eval.perplexity import load_tokenizer, score_checkpoint, tokenize_texts
from mergeserve.merge.api import merge
from mergeserve.sweep.runner import run_sweep
from tests.oracle import load_tensors

pytestmark = pytest.mark.slow

RECIPE = {
    "merge_method": "slerp", "base_model": "mistral-code", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "mistral-code", "layer_range": [0, 4]}, {"model": "mistral-prose", "layer_range": [0, 4]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
}


def _spec(tmp_path: Path, tiny_dir: Path, name: str = "sweep.yaml", **over) -> Path:
    data = {
        "recipe": RECIPE, "models_dir": str(tiny_dir),
        "axes": [{"path": "parameters.t[*]", "name": "t", "low": 0.0, "high": 1.0, "steps": 5}],
        "batch_size": 8, "output": "none",
        "eval": {"texts": {d: str(tiny_dir / "heldout" / f"{d}.txt") for d in ("code", "prose")}, "max_tokens": 1024},
        **over,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _t_sweep(tmp_path, tiny_dir):
    recipe = {**RECIPE, "parameters": {"t": 0.5}}
    return _spec(tmp_path, tiny_dir, recipe=recipe, axes=[{"path": "parameters.t", "name": "t", "low": 0.0, "high": 1.0, "steps": 5}])


def test_scores_only_t_sweep_shows_the_trade_off(ray_cluster, tiny_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_sweep(_t_sweep(tmp_path, tiny_dir), out, progress=False)
    rows = {r["values"]["t"]: r for r in summary["results"]}
    assert sorted(rows) == [0.0, 0.25, 0.5, 0.75, 1.0]
    code = [rows[t]["scores"]["code"]["ppl_token"] for t in sorted(rows)]
    prose = [rows[t]["scores"]["prose"]["ppl_token"] for t in sorted(rows)]
    # moving from the code fine-tune (t=0) to the prose fine-tune (t=1) trades code for prose
    assert code[0] < code[-1] and prose[0] > prose[-1]
    assert code[0] < code[2] < code[-1] and prose[0] > prose[2] > prose[-1]
    # t=0 is exactly the code model: its scores equal the code model's own, computed separately
    texts = {d: open(tiny_dir / "heldout" / f"{d}.txt").read() for d in ("code", "prose")}
    own = score_checkpoint(tiny_dir / "mistral-code", tokenize_texts(texts, load_tokenizer(tiny_dir / "mistral-code"), 256, 1024))
    assert rows[0.0]["scores"]["code"]["nll"] == own["code"].nll and rows[0.0]["scores"]["prose"]["nll"] == own["prose"].nll
    # one batch: the sources were read once for all five variants
    assert summary["read_ratio"] == pytest.approx(1 / 5)
    assert summary["best"]["code"]["name"] in {rows[0.0]["name"], rows[0.25]["name"]}
    assert summary["best"]["prose"]["name"] in {rows[1.0]["name"], rows[0.75]["name"]}
    assert rows[0.0]["name"] in summary["pareto"] and rows[1.0]["name"] in summary["pareto"]
    for f in ("results.csv", "results.json", "results.jsonl", "pareto.png", "tradeoff.png"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "variants").exists()  # scores only: nothing written
    assert len((out / "results.csv").read_text().splitlines()) == 6


def test_written_variants_equal_lone_merges_and_duplicates_merge_once(ray_cluster, tiny_dir, tmp_path):
    axes = [{"path": "parameters.t[self_attn]", "name": "t_attn", "values": [[0, 1], [0.2, 0.4], [0, 1], 0.5]}]
    spec = _spec(tmp_path, tiny_dir, axes=axes, batch_size=2, output="bfloat16", eval={"texts": {}})
    out = tmp_path / "out"
    summary = run_sweep(spec, out, workers=3, progress=False)
    rows = {r["name"]: r for r in summary["results"]}
    assert rows["v002"]["duplicate_of"] == "v000" and rows["v002"]["checkpoint"] == rows["v000"]["checkpoint"]
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["v000", "v001", "v003"]
    # 3 unique variants in batches of 2: sources read twice, against 4 times one by one
    assert summary["bytes_read"] * 2 == summary["bytes_read_naive"]
    for name in ("v000", "v001", "v003"):
        recipe = rows[name]["recipe"]
        lone = merge(recipe, tmp_path / f"lone-{name}", models_dir=tiny_dir, progress=False).out_dir
        got, want = load_tensors(out / "variants" / name), load_tensors(lone)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), name
        assert yaml.safe_load((out / "variants" / name / "mergekit_config.yml").read_text()) == yaml.safe_load(yaml.safe_dump(recipe))


def test_written_sweep_scores_checkpoints_and_resumes(ray_cluster, tiny_dir, tmp_path):
    spec = _spec(tmp_path, tiny_dir, axes=[{"path": "parameters.t[*]", "name": "t", "values": [0.1, 0.6, 0.9]}], batch_size=3,
                 output="bfloat16")
    out = tmp_path / "out"
    first = run_sweep(spec, out, progress=False)
    by_name = {r["name"]: r for r in first["results"]}
    scores = score_checkpoint(out / "variants" / "v001", tokenize_texts(
        {d: open(tiny_dir / "heldout" / f"{d}.txt").read() for d in ("code", "prose")}, load_tokenizer(out / "variants" / "v001"), 256, 1024))
    assert by_name["v001"]["scores"]["prose"]["nll"] == scores["prose"].nll
    with pytest.raises(OutputExistsError, match="--resume"):
        run_sweep(spec, out, progress=False)
    # an interrupted sweep: only v000 finished (its line survived), v001's checkpoint is gone
    lines = (out / "results.jsonl").read_text().splitlines()
    keep = [line for line in lines if json.loads(line)["name"] == "v000"]
    (out / "results.jsonl").write_text("\n".join(keep) + "\n")
    import shutil

    shutil.rmtree(out / "variants" / "v001")
    def stamps():
        return {f.name: f.stat().st_mtime_ns for f in (out / "variants" / "v000").glob("*.safetensors")}

    before = stamps()
    second = run_sweep(spec, out, resume=True, progress=False)
    assert before and stamps() == before  # v000 was not merged again
    assert second["bytes_read"] == first["bytes_read"]  # the two others: one batch, one read
    assert {r["name"] for r in second["results"]} == {"v000", "v001", "v002"}
    assert {r["name"]: r["scores"]["prose"]["nll"] for r in second["results"]} == {
        r["name"]: r["scores"]["prose"]["nll"] for r in first["results"]}


def test_adaptive_tpe_search(ray_cluster, tiny_dir, tmp_path):
    axes = [{"path": "parameters.t[*]", "name": "t", "low": 0.0, "high": 1.0}]
    spec = _spec(tmp_path, tiny_dir, axes=axes, search={"kind": "tpe", "budget": 6, "seed": 1, "objective": "prose"}, batch_size=3)
    summary = run_sweep(spec, tmp_path / "out", progress=False)
    rows = summary["results"]
    assert sorted(r["name"] for r in rows) == [f"v00{i}" for i in range(6)]
    assert all(0.0 <= r["values"]["t"] <= 1.0 for r in rows)
    best = summary["best"]["prose"]
    assert best["ppl_token"] == min(r["scores"]["prose"]["ppl_token"] for r in rows)
    assert math.isfinite(best["ppl_token"])
    # seeded: the same spec asks for the same points again
    again = run_sweep(spec, tmp_path / "out2", progress=False)
    assert [r["values"]["t"] for r in sorted(again["results"], key=lambda r: r["name"])] == [
        r["values"]["t"] for r in sorted(rows, key=lambda r: r["name"])]


def test_multi_stage_sweep_merges_each_shared_stage_once(ray_cluster, tiny_dir, tmp_path):
    """Axes into an intermediate stage (pair's weight) and the final (t): the distinct intermediate
    stages are merged once for the whole sweep, and each variant equals its whole multi-stage
    recipe merged alone."""
    import copy

    from mergeserve.merge.options import MergeOptions
    from mergeserve.merge.stage_run import merge_stages
    from mergeserve.merge.stages import parse_stages
    from tests.sweep.test_variants import STAGED, STAGED_AXES

    spec = _spec(tmp_path, tiny_dir, recipe=STAGED, axes=STAGED_AXES, output="bfloat16", eval={"texts": {}}, batch_size=4)
    out = tmp_path / "out"
    summary = run_sweep(spec, out, progress=False)
    rows = {(r["values"]["w"], r["values"]["t"]): r for r in summary["results"]}
    assert sorted(rows) == [(0.6, 0.2), (0.6, 0.7), (0.8, 0.2), (0.8, 0.7)]
    assert sorted(p.name.rsplit("-", 1)[0] for p in (out / "stages").iterdir()) == ["pair", "pair", "side"]
    # the three shared stages read the three models once (6 one by one); the finals, in two
    # batches by pair, read 4 intermediates (8 one by one): all of one size
    assert summary["bytes_read"] * 2 == summary["bytes_read_naive"]
    docs = copy.deepcopy(STAGED)
    docs[0]["models"][0]["parameters"]["weight"] = 0.8
    docs[2]["parameters"]["t"] = 0.7
    lone = merge_stages(parse_stages(yaml.safe_dump_all(docs)), tmp_path / "lone", MergeOptions(models_dir=tiny_dir, progress=False))
    got, want = load_tensors(Path(rows[(0.8, 0.7)]["checkpoint"])), load_tensors(lone.out_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_serve_top_serves_and_load_tests_the_winners(ray_cluster, tiny_dir, tmp_path):
    """The last step of a sweep: the best two variants written, served side by side (Ray Serve +
    the vLLM CPU engine, in a child process) and load-tested with one workload into one report."""
    import psutil

    spec = _spec(tmp_path, tiny_dir, recipe={**RECIPE, "parameters": {"t": 0.5}},
                 axes=[{"path": "parameters.t", "name": "t", "values": [0.0, 0.3, 1.0]}])
    out = tmp_path / "out"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    summary = run_sweep(spec, out, serve_top=2, progress=False)
    ranked = [r["name"] for r in summary["results"]][:2]  # best mean perplexity first
    lt = summary["loadtest"]
    assert list(lt["models"]) == ranked
    assert sorted(p.name for p in (out / "variants").iterdir()) == sorted(ranked)  # only the winners written
    runs = {r["model"]: r for r in lt["report"]["runs"]}
    assert sorted(runs) == sorted(ranked)
    for r in runs.values():  # the same workload on both, every request answered in full
        assert r["requests"] == 32 and r["completed"] == 32 and r["failed"] == 0 and r["output_tokens"] == 32 * 32
    for f in ("loadtest.json", "loadtest.csv", "serve.log"):
        assert (out / "loadtest" / f).stat().st_size > 0
    assert list((out / "loadtest").glob("*.png"))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in left if "serve" in " ".join(p.cmdline())], "the server outlived the sweep"
