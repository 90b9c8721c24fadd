"""Merging a batch of variants of one recipe together, reading every source tensor once.

A merge sweep makes many variants of one recipe (a ``t`` grid, weights, densities, methods) from
the same input models. Merged one by one, every variant reads every source byte again. Here the
variants of a batch walk their plans in step: for each output tensor position the sources are
read (and cast) once and every variant's tensor is computed from them, through the method's
``many`` form where it has one (slerp computes its norms and angle once for all ``t``). Each
variant's tensors are bit-identical to merging that variant alone (:func:`run_shard`), so a sweep
result can be reproduced with a plain ``mergeserve merge`` of the variant's recipe.

Variants can be batched when their plans have the same structure (:func:`structure_key`): the
same output shards holding the same tensors made from the same source tensors of the same files.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergeserve.merge.execute import (
    ShardResult,
    SourceCache,
    TensorRecord,
    deterministic_threads,
    finish_tensor,
    in_order,
    load_inputs,
    oom_names,
    peak_rss_bytes,
    task_generator,
    task_params,
    tune_malloc,
)
from mergeserve.merge.methods.registry import get_method
from mergeserve.merge.plan import MergePlan, TensorTask
from mergeserve.merge.reader import ST_DTYPES
from mergeserve.merge.writer import ShardLayout, SlotWriter, create_sized

Outputs = list[tuple[str, torch.Tensor]]


def structure_key(plan: MergePlan) -> str:
    """Plans with equal keys read the same source tensors into the same output layout."""
    layout = tuple(
        (s.filename, tuple((t.name, t.sources, t.shape, t.transform) for t in s.tensors)) for s in plan.shards
    )
    return hashlib.sha256(repr((tuple((m.path, m.lora) for m in plan.models), layout)).encode()).hexdigest()[:16]


def content_key(plan: MergePlan) -> str:
    """Plans with equal keys produce identical checkpoints (used to merge duplicates once)."""
    return hashlib.sha256(repr((plan.method, plan.models, plan.shards, plan.out_config, plan.out_dtype)).encode()).hexdigest()[:16]


def compute_many(
    tasks: Sequence[TensorTask], methods: Sequence[str], sources: SourceCache, device: str = "cpu"
) -> list[Outputs]:
    """One output tensor position for every variant: ``tasks[i]`` (same sources) under ``methods[i]``.

    Sources are read once and cast once per compute dtype; variants with the same method and
    base are computed together by the method's ``many`` form.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (task, method) in enumerate(zip(tasks, methods)):
        groups.setdefault((method, task.base_index, task.compute_dtype), []).append(i)
    cast: dict[str, list[torch.Tensor]] = {}
    results: list[Outputs | None] = [None] * len(tasks)
    for (method, base_index, dtype), idx in groups.items():
        if dtype not in cast:
            cast[dtype] = load_inputs(tasks[idx[0]], sources, device, ST_DTYPES[dtype][0])
        inputs = cast[dtype]
        outs = get_method(method).call_many(
            inputs, base_index, [task_params(tasks[i]) for i in idx], [task_generator(tasks[i], device) for i in idx]
        )
        for i, out in zip(idx, outs):
            results[i] = finish_tensor(tasks[i], out, inputs, sources)
    del cast
    for m, name in tasks[0].sources:
        sources[m].release(name)
    return results  # type: ignore[return-value]


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
    tune_malloc()
    keys = {structure_key(p) for p in plans}
    if len(keys) != 1:
        raise ValueError("run_shard_many: the plans do not share one structure")
    own = sources is None
    sources = sources or SourceCache(plans[0].models)
    shards = [p.shards[shard_index] for p in plans]
    methods = [p.method for p in plans]
    writers: list[SlotWriter] = []
    tmps: list[Path] = []
    mem: list[dict[str, torch.Tensor]] = [{} for _ in plans]
    if out_dirs is not None:
        # Pre-sized files filled with O_DIRECT writes (SlotWriter): a sweep writes many
        # checkpoints, and filling fresh page-cache pages would cost more CPU than the merge.
        for d, s in zip(out_dirs, shards):
            layout = ShardLayout([e for t in s.tensors for e in t.outputs()])
            tmps.append(Path(d) / (s.filename + ".tmp"))
            create_sized(tmps[-1], layout)
            writers.append(SlotWriter(tmps[-1], layout.tensors))

    def emit(pos: int, future: Future) -> None:
        with oom_names(shards[0].filename, shards[0].tensors[pos].name):
            outs = future.result()
        for v, pairs in enumerate(outs):
            for name, t in pairs:
                if writers:
                    writers[v].write(name, t)
                else:
                    mem[v][name] = t
        if on_position:
            on_position(sum(sources[m].info(n).nbytes for m, n in shards[0].tensors[pos].sources))

    try:
        with deterministic_threads(), ThreadPoolExecutor(max(1, threads), thread_name_prefix="merge-many") as pool:
            in_order(pool, lambda pos: compute_many([s.tensors[pos] for s in shards], methods, sources, device),
                     range(len(shards[0].tensors)), threads, emit)
        if not writers:
            return mem
        results = []
        for d, s, w, tmp in zip(out_dirs, shards, writers, tmps):  # type: ignore[arg-type]
            hashes = w.close()
            os.replace(tmp, Path(d) / s.filename)
            entries = [e for t in s.tensors for e in t.outputs()]
            records = tuple(TensorRecord(n, tuple(sh), dt, hashes[n]) for n, dt, sh in entries)
            results.append(
                ShardResult(s.index, s.filename, records, s.bytes_read, s.bytes_written, time.perf_counter() - t0, peak_rss_bytes(), worker)
            )
        return results
    except BaseException:
        for w in writers:
            w.abort()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if own:
            sources.close()
