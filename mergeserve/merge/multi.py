"""Merging a batch of variants of one recipe together, reading every source tensor once.

A merge sweep makes many variants of one recipe (a ``t`` grid, weights, densities, methods) from
the same input models. Merged one by one, every variant reads every source byte again. Here the
variants of a batch walk their plans in step: for each output tensor position the sources are
read (and cast) once and every variant's tensor is computed from them, through the method's
``many`` form where it has one (slerp computes its norms and angle once for all ``t``). Each
variant's tensors are bit-identical to merging that variant alone (:func:`~mergeserve.merge.executor.run_shard`), so a sweep
result can be reproduced with a plain ``mergeserve merge`` of the variant's recipe.

Variants can be batched when their plans have the same structure (:func:`structure_key`): the
same output shards holding the same tensors made from the same source tensors of the same files.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mergeserve.merge.execute import SourceCache
from mergeserve.merge.executor import Executor, MemorySink, ShardResult, Sink, commit_shard, sources_for
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.writer import ShardLayout, SlotWriter, tmp_path


def structure_key(plan: MergePlan) -> str:
    """Plans with equal keys read the same source tensors into the same output layout."""
    layout = tuple(
        (s.filename, tuple((t.name, t.sources, t.shape, t.transform) for t in s.tensors)) for s in plan.shards
    )
    return hashlib.sha256(repr((tuple((m.path, m.lora) for m in plan.models), layout)).encode()).hexdigest()[:16]


def content_key(plan: MergePlan) -> str:
    """Plans with equal keys produce identical checkpoints (used to merge duplicates once)."""
    return hashlib.sha256(repr((plan.method, plan.models, plan.shards, plan.out_config, plan.out_dtype)).encode()).hexdigest()[:16]


def run_shard_many(
    plans: Sequence[MergePlan],
    shard_index: int,
    out_dirs: Sequence[str | Path] | None,
    *,
    sources: SourceCache | None = None,
    device: str = "cpu",
    threads: int = 1,
    on_position: Callable[[int], None] | None = None,
    worker: str = "local",
) -> list[ShardResult] | list[dict[str, torch.Tensor]]:
    """Shard ``shard_index`` of every plan in ``plans`` (one structure), from one read of its sources.

    With ``out_dirs`` (one per plan) each variant's shard is streamed to ``out_dir/filename`` (via
    ``.tmp``) and a :class:`ShardResult` per variant is returned; with ``None`` nothing is written
    and each variant's tensors come back in memory as ``{name: tensor}`` (scores-only sweeps).
    ``on_position`` gets the source bytes read for each tensor position.
    """
    t0 = time.perf_counter()
    if len({structure_key(p) for p in plans}) != 1:
        raise ValueError("run_shard_many: the plans do not share one structure")
    shards = [p.shards[shard_index] for p in plans]
    positions = list(zip(*(s.tensors for s in shards)))
    with sources_for(plans[0], sources) as src:
        report = None
        if on_position is not None:
            def report(i: int) -> None:
                on_position(sum(src[m].info(n).nbytes for m, n in positions[i][0].sources))

        sinks = _sinks(shards, out_dirs)
        _, hashes = Executor(src, device, threads).run(
            [p.method for p in plans], positions, sinks, label=shards[0].filename, on_position=report
        )
    if out_dirs is None:
        return [s.tensors for s in sinks]  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    return [commit_shard(s, d, h, seconds, worker) for s, d, h in zip(shards, out_dirs, hashes)]


def _sinks(shards: Sequence, out_dirs: Sequence[str | Path] | None) -> list[Sink]:
    """In memory, or one file per variant: pre-sized and filled with O_DIRECT writes (SlotWriter),
    since a sweep writes many checkpoints and filling fresh page-cache pages would cost more CPU
    than the merge."""
    if out_dirs is None:
        return [MemorySink() for _ in shards]
    sinks: list[Sink] = []
    try:
        for d, s in zip(out_dirs, shards):
            sinks.append(SlotWriter.whole_file(tmp_path(Path(d) / s.filename), ShardLayout(s.outputs())))
    except BaseException:
        for w in sinks:
            w.abort()
        raise
    return sinks
