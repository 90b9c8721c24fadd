"""The Ray merge actor: executes parts of a plan's shards on one device (see cluster.parts).

One actor per GPU (``num_gpus=1``, math on ``cuda``) or per CPU share (``num_cpus=1``). An actor
keeps its input mmaps open across shards of the same plan. Ray restarts a killed actor
(``max_restarts``) and retries its task (``max_task_retries``); since a shard is written to a
``.tmp`` file and renamed only when all its parts are in, and every tensor is a deterministic
function of the plan (random methods use per-tensor seeds), a retried part rewrites the same bytes.
"""

from __future__ import annotations

import os

import ray


@ray.remote
class MergeWorker:
    def __init__(self, device: str = "cpu"):
        # The engine (and torch) is imported here, when the actor starts, so that the import
        # overlaps the driver's planning instead of delaying the first shard.
        from mergeserve.cluster import parts
        from mergeserve.merge import execute

        execute.tune_malloc()
        self._execute = execute
        self._parts = parts
        self.device = device
        # node (first 8 hex digits of the Ray node id) + pid: names the worker in summaries.
        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self._sources = None
        self._plan_fp: str | None = None

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id()}

    def ready(self) -> str:
        """Returns once the actor has started (its engine imported): the driver hands it parts then."""
        return self.name

    def run_part(self, plan, part, out_dir: str):
        """Merge ``part`` (a cluster.parts.Part) of ``plan`` (a MergePlan) into its shard's file in
        ``out_dir``; returns its PartResult."""
        if self._plan_fp != plan.fingerprint:
            if self._sources is not None:
                self._sources.close()
            self._sources = self._execute.SourceCache(plan.models)
            self._plan_fp = plan.fingerprint
        return self._parts.run_part(plan, part, out_dir, sources=self._sources, device=self.device, worker=self.name)
