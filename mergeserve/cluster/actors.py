"""The Ray merge actor: executes shard tasks of a plan on one device.

One actor per GPU (``num_gpus=1``, math on ``cuda``) or per CPU share (``num_cpus=1``). An actor
keeps its input mmaps open across shards of the same plan. Ray restarts a killed actor
(``max_restarts``) and retries its task (``max_task_retries``); since a shard is written to a
``.tmp`` file and renamed only when complete, and every tensor is a deterministic function of the
plan (random methods use per-tensor seeds), a retried shard is bit-identical to an undisturbed one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import ray


def result_path(out_dir: str | Path, filename: str) -> Path:
    """Where a finished shard's record (tensor names, shapes, sha256) is kept for --resume."""
    return Path(out_dir) / f".{filename}.done.json"


@ray.remote
class MergeWorker:
    def __init__(self, device: str = "cpu"):
        # The engine (and torch) is imported here, when the actor starts, so that the import
        # overlaps the driver's planning instead of delaying the first shard.
        from mergeserve.merge import execute

        execute.tune_malloc()
        self._execute = execute
        self.device = device
        # node (first 8 hex digits of the Ray node id) + pid: names the worker in summaries.
        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self._sources = None
        self._plan_fp: str | None = None

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id()}

    def run(self, plan, shard_index: int, out_dir: str):
        """Merge shard ``shard_index`` of ``plan`` (a MergePlan) into ``out_dir``; returns its ShardResult."""
        if self._plan_fp != plan.fingerprint:
            if self._sources is not None:
                self._sources.close()
            self._sources = self._execute.SourceCache(plan.models)
            self._plan_fp = plan.fingerprint
        shard = plan.shards[shard_index]
        res = self._execute.run_shard(plan, shard, out_dir, sources=self._sources, device=self.device, worker=self.name)
        # The record is written after the shard's rename: a record on disk implies a complete shard.
        rec = result_path(out_dir, shard.filename)
        tmp = rec.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(res)))
        os.replace(tmp, rec)
        return res
