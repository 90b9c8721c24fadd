"""The Ray merge as a multi-stage recipe's stage runner (see :mod:`mergeserve.merge.stage_run`).

For now each stage is one :func:`~mergeserve.cluster.driver.merge_distributed` call, in
topological order; running independent stages side by side as Ray work, and reading shared
inputs once, replaces this runner without touching the recipe handling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeserve.merge.config import MergeConfig


def ray_runner(*, address: str | None = None, workers: int | None = None, device: str = "cpu", progress: bool = True, **plan_kw: Any):
    """A stage runner merging each stage with the Ray merge (``plan_kw`` as for ``merge_distributed``)."""
    from mergeserve.cluster.driver import merge_distributed
    from mergeserve.merge.api import plan_merge

    def run(config: MergeConfig, out_dir: Path):
        return merge_distributed(config, out_dir, address=address, workers=workers, device=device, progress=progress, **plan_kw)

    check_kw = {k: v for k, v in plan_kw.items() if k != "out_shard_size"}  # "auto" is sized by the driver
    run.check = lambda config: plan_merge(config, **check_kw)
    run.options = repr(sorted(plan_kw.items()))
    return run
