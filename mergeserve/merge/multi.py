"""Merging several plans together, reading every source tensor once: sweep variants and the
independent stages of a multi-stage recipe.

A merge sweep makes many variants of one recipe (a ``t`` grid, weights, densities, methods) from
the same input models; a multi-stage recipe may have stages that read the same models. Merged
one by one, each of them reads every source byte again. Here the plans of a :class:`Batch` walk
their shards in step: for each output tensor position every distinct source tensor is read (and
cast) once, and each plan's tensor is computed from them, through the method's ``many`` form
where plans share their sources (slerp computes its norms and angle once for all ``t``). Each
plan's tensors are bit-identical to merging it alone (:func:`~mergeserve.merge.executor.run_shard`),
so a sweep result can be reproduced with a plain ``mergeserve merge`` of the variant's recipe.

Plans can be batched when they write the same output layout (:func:`layout_key`: the same shard
files holding the same tensors, each of the same dtype and shape). A sweep batches by the stricter
:func:`structure_key` (the same source tensors too), so that its variants share every read.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergeserve.merge.execute import SourceCache, distinct_sources
from mergeserve.merge.executor import Executor, MemorySink, Outcome, ShardResult, Sink, commit_shard, shard_writer, sources_for
from mergeserve.merge.plan import MergePlan, ModelInput, ShardTask, TensorTask
from mergeserve.merge.writer import tmp_path


def structure_key(plan: MergePlan) -> str:
    """Plans with equal keys read the same source tensors into the same output layout."""
    layout = tuple(
        (s.filename, tuple((t.name, t.sources, t.shape, t.transform) for t in s.tensors)) for s in plan.shards
    )
    return hashlib.sha256(repr((tuple((m.path, m.lora) for m in plan.models), layout)).encode()).hexdigest()[:16]


def layout_key(plan: MergePlan) -> str:
    """Plans with equal keys write the same files: the same tensors, dtypes and shapes, in order."""
    layout = tuple((s.filename, tuple(tuple(t.outputs()) for t in s.tensors)) for s in plan.shards)
    return hashlib.sha256(repr((plan.allow_pickle, layout)).encode()).hexdigest()[:16]


def content_key(plan: MergePlan) -> str:
    """Plans with equal keys produce identical checkpoints (used to merge duplicates once)."""
    return hashlib.sha256(repr((plan.method, plan.models, plan.shards, plan.out_config, plan.out_dtype)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Batch:
    """Plans of one output layout, merged position by position from one set of inputs.

    ``models`` holds every plan's input models once (by path: what a
    :class:`~mergeserve.merge.execute.SourceCache` of the batch opens); ``index[k][i]`` is plan
    ``k``'s model ``i`` there. A batch of one plan reads exactly what the plan reads.
    """

    plans: tuple[MergePlan, ...]
    models: tuple[ModelInput, ...]
    allow_pickle: bool
    index: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, plans: Sequence[MergePlan]) -> Batch:
        if not plans or len({layout_key(p) for p in plans}) != 1:
            raise ValueError("Batch: the plans do not write one output layout")
        paths: dict[str, int] = {}
        models: list[ModelInput] = []
        for m in (m for p in plans for m in p.models):
            if m.path not in paths:
                paths[m.path] = len(models)
                models.append(m)
        index = tuple(tuple(paths[m.path] for m in p.models) for p in plans)
        return cls(tuple(plans), tuple(models), plans[0].allow_pickle, index)

    @property
    def shards(self) -> tuple[ShardTask, ...]:
        """The layout (file names, tensors' outputs, bytes written) every plan shares."""
        return self.plans[0].shards

    @property
    def methods(self) -> list[str]:
        return [p.method for p in self.plans]

    def positions(self, shard: int, start: int = 0, stop: int | None = None) -> list[tuple[TensorTask, ...]]:
        """Tensors ``start`` .. ``stop - 1`` of shard ``shard``: one task per plan, its sources
        numbered in :attr:`models`."""
        per_plan = [
            [self._rebased(k, t) for t in p.shards[shard].tensors[start:stop]] for k, p in enumerate(self.plans)
        ]
        return list(zip(*per_plan))

    def _rebased(self, k: int, task: TensorTask) -> TensorTask:
        ix = self.index[k]
        if all(ix[m] == m for m, _ in task.sources):
            return task
        return replace(task, sources=tuple((ix[m], name) for m, name in task.sources))

    def outcome_of(self, k: int, shard: int, outcome: Outcome) -> Outcome:
        """``outcome`` as plan ``k`` alone would have had it: its source digests keyed by its own
        model numbers (what its shard's resume record holds)."""
        return replace(outcome, digests=self.plan_digests(k, self.plans[k].shards[shard].tensors[: outcome.done], outcome.digests))

    def plan_digests(self, k: int, tasks: Sequence[TensorTask], digests: dict) -> dict:
        """The digests of the sources of plan ``k``'s ``tasks``, from ``digests`` (keyed by
        (model number in :attr:`models`, tensor name)), keyed by plan ``k``'s own model numbers."""
        ix = self.index[k]
        return {(m, name): digests[(ix[m], name)] for t in tasks for m, name in t.sources}

    def bytes_read_one_by_one(self) -> int:
        """What merging the plans one by one reads."""
        return sum(p.bytes_read for p in self.plans)


def position_bytes(sources: SourceCache, position: Sequence[TensorTask]) -> int:
    """Bytes read for one position: each distinct source tensor's stored size."""
    return sum(sources[m].info(n).nbytes for m, n in distinct_sources(position))


def run_shard_many(
    plans: Sequence[MergePlan] | Batch,
    shard_index: int,
    out_dirs: Sequence[str | Path] | None,
    *,
    sources: SourceCache | None = None,
    device: str = "cpu",
    threads: int = 1,
    on_position: Callable[[int], None] | None = None,
    worker: str = "local",
    direct: bool = True,
) -> list[ShardResult] | list[dict[str, torch.Tensor]]:
    """Shard ``shard_index`` of every plan (one layout: see :class:`Batch`), from one read of its sources.

    With ``out_dirs`` (one per plan) each plan's shard is streamed to ``out_dir/filename`` (via
    ``.tmp``) and a :class:`ShardResult` per plan is returned; with ``None`` nothing is written
    and each plan's tensors come back in memory as ``{name: tensor}`` (scores-only sweeps).
    ``sources`` must read the batch's models (a SourceCache of the batch, or of the first plan
    when the plans share their inputs). ``on_position`` gets the source bytes read for each
    tensor position.
    """
    t0 = time.perf_counter()
    batch = plans if isinstance(plans, Batch) else Batch.of(plans)
    shards = [p.shards[shard_index] for p in batch.plans]
    positions = batch.positions(shard_index)
    with sources_for(batch, sources) as src:
        report = None
        if on_position is not None:
            def report(i: int) -> None:
                on_position(position_bytes(src, positions[i]))

        sinks = _sinks(shards, out_dirs, direct)
        outcome = Executor(src, device, threads).run(
            batch.methods, positions, sinks, label=shards[0].filename, on_position=report
        )
    if out_dirs is None:
        return [s.tensors for s in sinks]  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    return [
        commit_shard(p, s, d, batch.outcome_of(k, shard_index, outcome), k, seconds, worker)
        for k, (p, s, d) in enumerate(zip(batch.plans, shards, out_dirs))
    ]


def _sinks(shards: Sequence, out_dirs: Sequence[str | Path] | None, direct: bool = True) -> list[Sink]:
    """In memory, or one file per plan (see :func:`~mergeserve.merge.executor.shard_writer`)."""
    if out_dirs is None:
        return [MemorySink() for _ in shards]
    sinks: list[Sink] = []
    try:
        for d, s in zip(out_dirs, shards):
            sinks.append(shard_writer(tmp_path(Path(d) / s.filename), s, direct=direct))
    except BaseException:
        for w in sinks:
            w.abort()
        raise
    return sinks
