"""A multi-stage recipe as one Ray job on a real 3-node cluster: equal to the in-process merge (which
tests/merge/test_stages.py checks against mergekit-multi) bit for bit, intermediates included; the
stages sharing an input read it once; an interrupted run resumes from its verified stages."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mergeserve.cluster.stages import merge_stages_distributed
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.stage_run import merge_stages
from mergeserve.merge.stages import FINAL, parse_stages
from tests.merge.test_stages import DOCS, NAMES, _text
from tests.oracle import load_tensors

pytestmark = pytest.mark.slow


class _Interrupt(Exception):
    pass


def _equal(a, b):
    ta, tb = load_tensors(a), load_tensors(b)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def local_run(random_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages-local") / "out"
    opts = MergeOptions(progress=False, keep_intermediates=True, models_dir=random_models["root"])
    return merge_stages(parse_stages(_text(DOCS)), out, opts)


def test_stages_on_ray_equal_the_local_merge_and_share_reads(ray_cluster, random_models, local_run, tmp_path):
    opts = MergeOptions(progress=False, keep_intermediates=True, models_dir=random_models["root"], out_shard_size="1M")
    result = merge_stages_distributed(parse_stages(_text(DOCS)), tmp_path / "out", opts)
    _equal(result.out_dir, local_run.out_dir)
    for name in NAMES:
        _equal(result.out_dir / "stages" / name, local_run.out_dir / "stages" / name)
    assert result.groups == [["pair", "side"], ["blend"], [FINAL]]
    assert result.bytes_read == local_run.bytes_read < result.bytes_read_one_by_one
    workers = {w for r in result.results.values() for w in r.workers}
    assert len({w.split(":")[0] for w in workers}) >= 2, f"every stage ran on one node: {workers}"


def test_interrupted_stages_on_ray_resume_from_the_verified_ones(ray_cluster, random_models, local_run, tmp_path, monkeypatch):
    import mergeserve.cluster.driver as driver

    graph = parse_stages(_text(DOCS))
    opts = MergeOptions(progress=False, models_dir=random_models["root"])
    real = driver.finish_run

    def interrupted(run, t0):  # stands in for a kill as the final stage is being written
        if run.name == f"stage {FINAL}":
            raise _Interrupt("killed")
        return real(run, t0)

    monkeypatch.setattr(driver, "finish_run", interrupted)
    with pytest.raises(_Interrupt):
        merge_stages_distributed(graph, tmp_path / "out", opts)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / "stages" / "blend").is_dir()
    monkeypatch.undo()
    result = merge_stages_distributed(graph, tmp_path / "out", replace(opts, resume=True))
    assert result.reused == ["pair", "side", "blend"] and list(result.results) == [FINAL]
    _equal(result.out_dir, local_run.out_dir)
