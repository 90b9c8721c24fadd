"""Parts (runs of tensors of one shard) without Ray: every tensor in exactly one part, and a shard
assembled from parts written in any order, by several writers, is the single-process file byte
for byte."""

from __future__ import annotations

import json

import pytest

from mergeserve.cluster.parts import ShardAssembler, prepare_shard, run_part, split_parts
from mergeserve.merge.api import merge, plan_merge
from mergeserve.merge.execute import SourceCache
from mergeserve.merge.multi import Batch
from mergeserve.merge.resume import done_record

SLERP = {
    "merge_method": "slerp", "base_model": "ft-a", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}, {"model": "ft-b", "layer_range": [0, 4]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]},
}


@pytest.mark.parametrize("workers", [1, 2, 7])
def test_parts_cover_every_tensor_once_in_order(random_models, workers):
    _, _, plan = plan_merge(SLERP, models_dir=random_models["root"], out_shard_size="2M")
    parts = split_parts(plan.shards, workers)
    for shard in plan.shards:
        mine = [p for p in parts if p.shard == shard.index]
        assert mine[0].start == 0 and mine[-1].stop == len(shard.tensors)
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        assert all(p.start < p.stop for p in mine)
        assert sum(p.bytes_written for p in mine) == shard.bytes_written
    assert len(parts) >= len(plan.shards)


@pytest.mark.parametrize("out_dtype", [None, "fp8"])
def test_shard_from_parts_in_reverse_order_equals_single_process(random_models, tmp_path, monkeypatch, out_dtype):
    import mergeserve.cluster.parts as parts_mod

    monkeypatch.setattr(parts_mod, "MIN_PART_BYTES", 1)  # many small parts, even for tiny models
    kw = dict(models_dir=random_models["root"], out_shard_size="1M", out_dtype=out_dtype)
    reference = merge(SLERP, tmp_path / "ref", progress=False, **kw)
    _, _, plan = plan_merge(SLERP, **kw)
    out = tmp_path / "parts"
    out.mkdir()
    for s in plan.shards:
        prepare_shard(out, s)
    parts = split_parts(plan.shards, 4)
    assert len(parts) > 2 * len(plan.shards)
    batch = Batch.of([plan])
    asm = ShardAssembler(batch, parts, [out])
    sources = [SourceCache(batch), SourceCache(batch)]  # two "workers"
    for i, p in enumerate(reversed(parts)):
        asm.add(run_part(batch, p, [out], sources=sources[i % 2], worker=f"w{i % 2}"))
    assert asm.done
    for s in plan.shards:
        assert (out / s.filename).read_bytes() == (reference.out_dir / s.filename).read_bytes()
        assert not (out / f"{s.filename}.tmp").exists()
        record = json.loads(done_record(out, s.filename).read_text())
        want = {r.name: r.digest for r in next(x for x in reference.shards if x.index == s.index).tensors}
        assert {t["name"]: t["digest"] for t in record["tensors"]} == want


def test_part_stopped_between_tensors_hands_back_the_rest(random_models, tmp_path):
    """What a driver helper does once the actors are up: stop after the tensor in progress; the
    rest of its part, merged by another worker, completes a file equal to the reference."""
    from mergeserve.cluster.parts import Part

    kw = dict(models_dir=random_models["root"], out_shard_size="100M")
    reference = merge(SLERP, tmp_path / "ref", progress=False, **kw)
    _, _, plan = plan_merge(SLERP, **kw)
    (shard,) = plan.shards
    out = tmp_path / "parts"
    out.mkdir()
    prepare_shard(out, shard)
    whole = Part(shard.index, 0, len(shard.tensors), shard.bytes_written)
    batch = Batch.of([plan])
    asm = ShardAssembler(batch, [whole], [out])
    first = run_part(batch, whole, [out], sources=SourceCache(batch), should_stop=lambda: True)
    assert (first.part.start, first.part.stop) == (0, 1) and [len(t) for t in first.tensors] == [1]
    assert asm.add(first) is None and not asm.done
    rest = Part(shard.index, 1, whole.stop, whole.bytes_written - first.part.bytes_written)
    assert asm.add(run_part(batch, rest, [out], sources=SourceCache(batch))) is not None
    assert (out / shard.filename).read_bytes() == (reference.out_dir / shard.filename).read_bytes()
