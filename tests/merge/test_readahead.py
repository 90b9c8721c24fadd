"""The read-ahead under the executor: the same tensors from the disk (O_DIRECT) as from the page
cache, each source's digest, a file cut short under it, sources handed on unchanged (passthrough)
outliving the reused read buffer, sources read by several positions, and the arena's ring."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from mergeserve.errors import InputError
from mergeserve.merge import readahead
from mergeserve.merge.api import merge, plan_merge
from mergeserve.merge.execute import SourceCache
from mergeserve.merge.executor import Executor, MemorySink
from mergeserve.merge.readahead import Arena
from tests.oracle import load_tensors

SLERP = {
    "merge_method": "slerp", "base_model": "ft-a", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}, {"model": "ft-b", "layer_range": [0, 4]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
}
# Layers 1-3 of ft-a twice: the same source tensors for two positions each, handed on unchanged.
FRANKEN = {
    "merge_method": "passthrough", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}]}, {"sources": [{"model": "ft-a", "layer_range": [1, 4]}]}],
}


@pytest.fixture
def models(random_models, tmp_path) -> Path:
    root = tmp_path / "models"
    for m in ("ft-a", "ft-b"):
        shutil.copytree(random_models["root"] / m, root / m)
    return root


def _evict(root: Path) -> None:
    """Drop the models' files from the page cache (written back first: dirty pages stay)."""
    for f in root.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(root: Path) -> None:
    for f in root.rglob("*.safetensors"):
        f.read_bytes()


def _run(plan, sources):
    shard = plan.shards[0]
    sink = MemorySink()
    outcome = Executor(sources, threads=2).run([plan.method], [(t,) for t in shard.tensors], [sink], label=shard.filename)
    return sink.tensors, outcome


def test_from_the_disk_as_from_the_page_cache(models):
    _, _, plan = plan_merge(SLERP, models_dir=models)
    _evict(models)
    sources = SourceCache(plan)
    try:
        name = plan.shards[0].tensors[0].sources[0][1]
        if sources[0].resident(name):
            pytest.skip("this filesystem keeps the files cached (tmpfs?): no O_DIRECT reads to test")
        cold, cold_out = _run(plan, sources)
        _warm(models)
        assert sources[0].resident(name)
        warm, warm_out = _run(plan, sources)
    finally:
        sources.close()
    assert list(cold) == list(warm) and all(torch.equal(cold[k], warm[k]) for k in cold)
    assert cold_out.digests == warm_out.digests
    files = SourceCache(plan)
    try:
        for (m, name), d in cold_out.digests.items():
            assert d == xxhash.xxh3_128(files[m].raw(name)).hexdigest()
    finally:
        files.close()


def test_file_cut_short_while_merging_names_it(models):
    """Headers read (the sources open), then the file shrinks: the read fails naming the file."""
    _, _, plan = plan_merge(SLERP, models_dir=models)
    sources = SourceCache(plan)
    try:
        for m in range(len(plan.models)):
            sources[m]  # noqa: B018 - opens the model (reads its headers)
        victim = models / "ft-b" / "model.safetensors"
        os.truncate(victim, victim.stat().st_size // 2)
        with pytest.raises(InputError, match=r"ft-b: model\.safetensors: ends at byte \d+, inside tensor .*truncated"):
            _run(plan, sources)
    finally:
        sources.close()


def test_sources_handed_on_unchanged_outlive_the_read_buffer(models, tmp_path, monkeypatch):
    """Passthrough returns its source; with a read-ahead budget of one position the buffer is
    reused at once, so an output still pointing into it would be overwritten before it is written."""
    monkeypatch.setattr(readahead, "AHEAD_POSITIONS", 0)  # a budget of the largest position
    _evict(models)
    res = merge(FRANKEN, tmp_path / "out", models_dir=models, progress=False, workers=2)
    got, a = load_tensors(res.out_dir), load_tensors(models / "ft-a")
    for i, src in enumerate([0, 1, 2, 3, 1, 2, 3]):
        for part in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm"):
            assert torch.equal(got[f"model.layers.{i}.{part}.weight"], a[f"model.layers.{src}.{part}.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


@pytest.mark.timeout(120)  # a read-ahead that waits for room it cannot get would hang: fail instead
@pytest.mark.parametrize("ahead", [0, 1, 3])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_small_budgets_and_many_threads_finish_with_the_same_tensors(random_models, models, monkeypatch, ahead, threads):
    """Budgets of one to a few positions (the last positions hold two 2 MB sources: a ring that
    placed them apart would never fit the pair), merged by one to four threads, cold."""
    _, _, plan = plan_merge(SLERP, models_dir=models)
    ref_sources = SourceCache(plan)
    try:
        want, _ = _run(plan, ref_sources)
    finally:
        ref_sources.close()
    monkeypatch.setattr(readahead, "AHEAD_POSITIONS", ahead)
    _evict(models)
    sources = SourceCache(plan)
    try:
        shard = plan.shards[0]
        sink = MemorySink()
        Executor(sources, threads=threads).run([plan.method], [(t,) for t in shard.tensors], [sink], label=shard.filename)
    finally:
        sources.close()
    assert list(sink.tensors) == list(want) and all(torch.equal(sink.tensors[k], want[k]) for k in want)


def test_arena_hands_out_regions_oldest_first():
    arena = Arena(16 * readahead.ALIGN)
    try:
        blk = readahead.ALIGN
        a, b, c = arena.alloc(6 * blk), arena.alloc(6 * blk), arena.alloc(6 * blk)
        assert (a, b, c) == (0, 6 * blk, None)  # 4 blocks left at the end: too few
        arena.free(b)
        assert arena.alloc(4 * blk) == 12 * blk  # freed out of order: b stays held behind a
        arena.free(a)  # now a and b go: the ring wraps to the start
        assert arena.alloc(12 * blk) == 0
        assert arena.alloc(1) is None
        arena.reset()
        assert arena.alloc(16 * blk) == 0
    finally:
        arena.close()
