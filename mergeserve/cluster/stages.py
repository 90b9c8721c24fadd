"""The Ray merge as a multi-stage recipe's stage runner (see :mod:`mergeserve.merge.stage_run`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mergeserve.merge.config import MergeConfig
from mergeserve.merge.options import AUTO, MergeOptions


def ray_runner(options: MergeOptions):
    """A stage runner merging each stage with the Ray merge, following ``options``."""
    from mergeserve.cluster.driver import merge_distributed
    from mergeserve.merge.api import plan_merge
    from mergeserve.merge.stage_run import _record_options

    each = replace(options, overwrite=False, resume=False)

    def run(config: MergeConfig, out_dir: Path):
        return merge_distributed(config, out_dir, each)

    run.check = lambda config: plan_merge(config, each, out_shard_size=None if each.out_shard_size == AUTO else each.out_shard_size)
    run.options = _record_options(each)
    return run
