"""The actors of a :class:`~mergeserve.cluster.pool.WorkerPool`: plain classes, made Ray actors
by the pool (one per GPU, ``num_gpus=1`` and math on ``cuda``, or one per CPU).

:class:`Worker` is what every actor has: a name for summaries, its device, and its inputs' files
kept open across tasks that read the same models. :class:`MergeWorker` executes parts of a plan's
shards (see cluster.parts); since a shard is written to a ``.tmp`` file and renamed only when all
its parts are in, and every tensor is a deterministic function of the plan (random methods use
per-tensor seeds), a part retried after its actor died rewrites the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Worker:
    def __init__(self, device: str = "cpu"):
        # The engine (and torch) is imported here, when the actor starts, so that the import
        # overlaps the driver's planning instead of delaying the first task.
        from mergeserve.cluster.pool import worker_name
        from mergeserve.merge.memory import tune_malloc

        tune_malloc()
        self.device = device
        self.name = worker_name()
        self._sources: Any = None

    def ready(self) -> str:
        """Returns once the actor has started (its engine imported): the pool hands it jobs then."""
        return self.name

    def sources_for(self, plan: Any) -> Any:
        """A SourceCache of ``plan``'s inputs (a MergePlan's or a Batch's), reused while tasks read
        the same models."""
        from mergeserve.merge.execute import SourceCache

        if self._sources is None or not self._sources.serves(plan):
            self.close()
            self._sources = SourceCache(plan)
        return self._sources

    def close(self) -> None:
        if self._sources is not None:
            self._sources.close()
        self._sources = None


class MergeWorker(Worker):
    def run_part(self, batch: Any, part: Any, out_dirs: Sequence[str], direct: bool = True) -> Any:
        """Merge ``part`` (a cluster.parts.Part) of every plan of ``batch`` (a merge.multi.Batch)
        into its shard's file in that plan's directory of ``out_dirs``; returns its PartResult."""
        from mergeserve.cluster.parts import run_part

        return run_part(batch, part, out_dirs, sources=self.sources_for(batch), device=self.device, worker=self.name, direct=direct)
