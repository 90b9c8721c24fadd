"""The one compute-and-write loop: equal files however many threads merge, stopping between
tensors, a failed batch leaving nothing behind, and the process-wide thread setting restored only
when the last of several threads leaves."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeserve.errors import InputError
from mergeserve.merge.api import plan_merge
from mergeserve.merge.execute import SourceCache, deterministic_threads
from mergeserve.merge.executor import Executor, MemorySink, run_shard
from mergeserve.merge.multi import run_shard_many

SLERP = {
    "merge_method": "slerp", "base_model": "ft-a", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}, {"model": "ft-b", "layer_range": [0, 4]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
}


def test_shard_is_the_same_file_with_one_or_several_threads(random_models, tmp_path):
    _, _, plan = plan_merge(SLERP, models_dir=random_models["root"])
    (shard,) = plan.shards
    files = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        out.mkdir()
        seen = []
        run_shard(plan, shard, out, threads=threads, on_tensor=seen.append)
        assert seen == [t.bytes_out for t in shard.tensors]  # in plan order, each once
        assert sorted(p.name for p in out.iterdir()) == [shard.filename]
        files.append((out / shard.filename).read_bytes())
    assert files[0] == files[1]


def test_stop_after_a_position_keeps_exactly_the_positions_done(random_models):
    _, _, plan = plan_merge(SLERP, models_dir=random_models["root"])
    tasks = plan.shards[0].tensors[:5]
    sink, asked = MemorySink(), []
    sources = SourceCache(plan)
    try:
        done, _ = Executor(sources).run(
            [plan.method], [(t,) for t in tasks], [sink], label="x", should_stop=lambda: len(asked) == 2 or asked.append(1)
        )
    finally:
        sources.close()
    assert done == 3 and list(sink.tensors) == [t.name for t in tasks[:3]]


def test_failed_batch_leaves_no_file_of_any_variant(random_models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(random_models["root"] / "ft-a", root / "ft-a")
    shutil.copytree(random_models["root"] / "ft-b", root / "ft-b")
    f = root / "ft-b" / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.2.mlp.up_proj.weight"].view(-1)[3] = float("nan")
    save_file(tensors, f)
    plans = [plan_merge({**SLERP, "parameters": {"t": t}}, models_dir=root)[2] for t in (0.2, 0.7)]
    dirs = [tmp_path / "v0", tmp_path / "v1"]
    for d in dirs:
        d.mkdir()
    with pytest.raises(InputError, match="ft-b.*up_proj.*NaN"):
        run_shard_many(plans, 0, dirs, threads=2)
    assert [list(d.iterdir()) for d in dirs] == [[], []]


def test_thread_setting_returns_when_the_last_user_leaves():
    before = torch.get_num_threads()
    entered, release_first, first_left = threading.Event(), threading.Event(), threading.Event()

    def first():
        with deterministic_threads():
            entered.set()
            release_first.wait()
        first_left.set()

    t = threading.Thread(target=first)
    t.start()
    entered.wait()
    with deterministic_threads():
        release_first.set()
        first_left.wait()
        assert torch.get_num_threads() == 1  # the first user left; this one is still inside
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # e.g. a pool's thread
        fresh.start()
        fresh.join()
        assert seen == [1]
    t.join()
    assert torch.get_num_threads() == before
