"""Merging several variants together (sweeps): every variant's tensors equal a lone merge's, bit for
bit, while each source tensor is read once for the whole batch."""

from __future__ import annotations

import pytest
import torch

from mergeserve.merge.api import merge, plan_merge
from mergeserve.merge.execute import SourceCache
from mergeserve.merge.methods.registry import get_method
from mergeserve.merge.methods.slerp import slerp_pair, slerp_pairs
from mergeserve.merge.multi import Batch, content_key, run_shard_many, structure_key
from tests.oracle import load_tensors

TS = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]


def _slerp(t):
    return {
        "merge_method": "slerp", "base_model": "ft-a", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 2]}, {"model": "ft-b", "layer_range": [0, 2]}]}],
        "parameters": {"t": t},
    }


def _dare(density):
    return {
        "merge_method": "dare_ties", "base_model": "base", "dtype": "bfloat16",
        "models": [{"model": "a", "parameters": {"weight": 0.6, "density": density}}, {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}}],
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_pairs_equal_separate_slerps_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 700, generator=g).to(dtype)  # > 2**20 elements: several chunks
    b = (a.float() + 0.3 * torch.randn(3000, 700, generator=g)).to(dtype)
    for t, got in zip(TS, slerp_pairs(TS, a, b)):
        assert torch.equal(got, slerp_pair(t, a, b)), t
    # near-colinear inputs take the lerp branch in both forms
    for t, got in zip(TS, slerp_pairs(TS, a, a * 1.0001)):
        assert torch.equal(got, slerp_pair(t, a, a * 1.0001))


def test_call_many_falls_back_to_one_call_per_parameter_set_for_random_methods():
    spec = get_method("dare_ties")
    assert spec.random and spec.many is None
    xs = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = [{"weight": [None, 0.5, 0.5], "density": [None, d, 0.5]} for d in (0.3, 0.7)]
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    got = spec.call_many(xs, 0, params, gens)
    for p, out in zip(params, got):
        assert torch.equal(out, spec(xs, 0, generator=torch.Generator().manual_seed(5), **p))


def _plans(recipes, models_dir, **kw):
    return [plan_merge(r, models_dir=models_dir, **kw)[2] for r in recipes]


@pytest.mark.parametrize("kind", ["slerp", "dare", "fp8"])
def test_batch_written_equals_lone_merges(random_models, tmp_path, kind):
    root = random_models["root"]
    if kind == "dare":
        recipes = [_dare(d) for d in (0.2, 0.5, 0.8)]
        names = {"base": "base", "a": "ft-a", "b": "ft-b"}
        for r in recipes:  # the random-model fixture's directory names
            r["base_model"] = names[r["base_model"]]
            for m in r["models"]:
                m["model"] = names[m["model"]]
    else:
        recipes = [_slerp(t) for t in (0.2, [0, 0.5, 1], 0.8)]
    kw = {"out_dtype": "fp8"} if kind == "fp8" else {}
    plans = _plans(recipes, root, out_shard_size="2M", **kw)
    assert len({structure_key(p) for p in plans}) == 1 and len(plans[0].shards) > 1
    dirs = [tmp_path / f"v{i}" for i in range(len(plans))]
    for d in dirs:
        d.mkdir()
    sources = SourceCache(plans[0])
    try:
        reads = []
        for k in range(len(plans[0].shards)):
            results = run_shard_many(plans, k, dirs, sources=sources, threads=2, on_position=reads.append)
            assert [r.filename for r in results] == [p.shards[k].filename for p in plans]
    finally:
        sources.close()
    # each source tensor read once for the whole batch: the bytes of ONE variant's plan
    assert sum(reads) == plans[0].bytes_read
    for i, recipe in enumerate(recipes):
        lone = merge(recipe, tmp_path / f"lone{i}", models_dir=root, out_shard_size="2M", progress=False, **kw)
        for shard in plans[i].shards:
            assert (dirs[i] / shard.filename).read_bytes() == (lone.out_dir / shard.filename).read_bytes()


def test_batch_in_memory_equals_written(random_models, tmp_path):
    root = random_models["root"]
    plans = _plans([_slerp(t) for t in (0.25, 0.75)], root)
    mem = run_shard_many(plans, 0, None)
    lone = merge(_slerp(0.75), tmp_path / "lone", models_dir=root, progress=False)
    written = load_tensors(lone.out_dir)
    assert sorted(mem[1]) == sorted(written)
    assert all(torch.equal(mem[1][k], written[k]) for k in written)
    assert not torch.equal(mem[0]["model.layers.0.mlp.up_proj.weight"], mem[1]["model.layers.0.mlp.up_proj.weight"])


def test_keys_tell_identical_and_batchable_plans_apart(random_models):
    root = random_models["root"]
    p_scalar, p_grad, p_other = _plans([_slerp(0.5), _slerp([0.5, 0.5]), _slerp(0.6)], root)
    assert content_key(p_scalar) == content_key(p_grad)  # the same tensors: merged once in a sweep
    assert content_key(p_scalar) != content_key(p_other)
    assert structure_key(p_scalar) == structure_key(p_other)
    swapped = _slerp(0.5)
    swapped["slices"][0]["sources"][1]["model"] = "ft-c"
    assert structure_key(_plans([swapped], root)[0]) != structure_key(p_scalar)


def test_plans_of_one_layout_with_different_sources_share_the_reads_they_have_in_common(random_models, tmp_path):
    """Independent stages of a multi-stage recipe: slerp(a, b) and slerp(a, c) write one layout;
    merged together, ft-a is read once, and each plan's shard equals its lone merge."""
    root = random_models["root"]
    other = _slerp(0.5)
    other["slices"][0]["sources"][1]["model"] = "ft-c"
    recipes = [_slerp(0.3), other]
    plans = _plans(recipes, root)
    batch = Batch.of(plans)
    assert [m.ref for m in batch.models] == ["ft-a", "ft-b", "ft-c"] and batch.index == ((0, 1), (0, 2))
    dirs = [tmp_path / "v0", tmp_path / "v1"]
    for d in dirs:
        d.mkdir()
    reads: list[int] = []
    run_shard_many(batch, 0, dirs, threads=2, on_position=reads.append)
    assert sum(reads) == batch.bytes_read_one_by_one() * 3 // 4  # a, b, c of equal sizes, instead of a + b + a + c
    for d, recipe, plan in zip(dirs, recipes, plans):
        lone = merge(recipe, tmp_path / f"lone-{d.name}", models_dir=root, progress=False)
        assert (d / plan.shards[0].filename).read_bytes() == (lone.out_dir / plan.shards[0].filename).read_bytes()


def test_a_batch_refuses_plans_of_different_layouts(random_models):
    root = random_models["root"]
    plans = _plans([_slerp(0.5)], root) + _plans([_slerp(0.5)], root, out_dtype="float32")
    with pytest.raises(ValueError, match="layout"):
        run_shard_many(plans, 0, None)
