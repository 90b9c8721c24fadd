"""The math of one output tensor position: read its sources, merge, check, quantize or cast.

Every merged tensor is computed by :func:`compute_position`, called by the one loop that runs
positions and writes them (:class:`~mergeserve.merge.executor.Executor`). A *position* is one
output tensor of a plan, given as one :class:`TensorTask` per variant (one for a plain merge,
several for a batch: sweep variants, or stages of one output layout, see :mod:`.multi`): each
source tensor is read once for every variant, and cast once for those sharing it. Sources are
mmap views of the page cache, dropped from this process's mapping once merged, so memory is
bounded by the tensors in flight.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from mergeserve.errors import InputError, ResourceError
from mergeserve.merge.methods.registry import get_method
from mergeserve.merge.phases import PhaseClock, thread_cpu
from mergeserve.merge.plan import MergePlan, ModelInput, TensorTask
from mergeserve.merge.quantize import FP8_BLOCK, quantize_fp8_block
from mergeserve.merge.reader import ST_DTYPES, ModelFiles

Outputs = list[tuple[str, torch.Tensor]]  # (name, tensor) of one task: two for FP8 (weight, scale)

class SourceCache:
    """Open :class:`ModelFiles` of a plan's input models, reused across shards in one process.

    Built from the plan, so that every reader honours how the planner read the inputs
    (``allow_pickle``).
    """

    def __init__(self, plan: MergePlan):
        self.models: Sequence[ModelInput] = plan.models
        self.allow_pickle = plan.allow_pickle
        self._files: dict[int, ModelFiles] = {}
        self._arenas: list = []  # read-ahead arenas not in use
        self._lock = threading.Lock()

    def __getitem__(self, i: int) -> ModelFiles:
        with self._lock:
            f = self._files.get(i)
            if f is None:
                m = self.models[i]
                f = self._files[i] = ModelFiles(m.path, allow_pickle=self.allow_pickle, label=m.ref)
            return f

    @contextmanager
    def arena(self, capacity: int):
        """A read-ahead :class:`~mergeserve.merge.readahead.Arena` of at least ``capacity`` bytes,
        for the block. Arenas are kept for the next shard or part: filling a fresh one costs a
        page fault per 4 KiB (a quarter of a second per GiB here), once per process instead."""
        from mergeserve.merge.readahead import Arena

        with self._lock:
            fits = [a for a in self._arenas if a.capacity >= capacity]
            a = min(fits, key=lambda a: a.capacity) if fits else None
            if a is not None:
                self._arenas.remove(a)
        if a is None:
            a = Arena(capacity)
        try:
            yield a
        finally:
            a.reset()
            with self._lock:
                self._arenas.append(a)

    def serves(self, plan: MergePlan) -> bool:
        """Whether this cache reads ``plan``'s inputs as ``plan`` says to."""
        return self.models == plan.models and self.allow_pickle == plan.allow_pickle

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        for a in self._arenas:
            a.close()
        self._arenas.clear()


def load_inputs(task: TensorTask, sources: SourceCache, device: str = "cpu", dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The task's source tensors, shape-checked and cast to its compute dtype on ``device``."""
    dtype = dtype or ST_DTYPES[task.compute_dtype].torch
    xf = task.transform
    inputs = []
    for k, (m, name) in enumerate(task.sources):
        t = sources[m].get(name)
        planned = xf.source_shapes[k] if xf else task.shape
        if tuple(t.shape) != planned:
            raise InputError(f"model {sources.models[m].ref}: tensor {name!r} has shape {list(t.shape)}, planned {list(planned)}")
        if xf:
            t = xf.patch(k, t)
        inputs.append(t.to(device=device, dtype=dtype))
    return xf.remap(inputs) if xf else inputs


def task_params(task: TensorTask) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in task.params}


def task_generator(task: TensorTask, device: str = "cpu") -> torch.Generator | None:
    if task.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(task.seed)
    return gen


def finish_tensor(
    task: TensorTask, out: torch.Tensor, inputs: Sequence[torch.Tensor], sources: SourceCache, clock: PhaseClock | None = None
) -> Outputs:
    """Check a merged tensor for NaN/Inf, then quantize or cast it: [(name, tensor)] on CPU.
    ``clock`` gets the quantization's CPU time ("quantize")."""
    # NaN/Inf anywhere make the sum non-finite; the sum is ~100x cheaper than isfinite().all(),
    # which only runs, to find the culprit, when the sum is not finite.
    if out.is_floating_point() and not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        for (m, name), t in zip(task.sources, inputs):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"model {sources.models[m].ref}: tensor {name!r} contains NaN or Inf")
        raise InputError(f"tensor {task.name!r}: the merge produced NaN or Inf (check the method's parameters)")
    if task.quantize == FP8_BLOCK:
        t0 = thread_cpu()
        q, s = quantize_fp8_block(out)
        if clock is not None:
            clock.add("quantize", thread_cpu() - t0)
        return [(task.name, q.cpu()), (task.scale_name, s.cpu())]
    return [(task.name, out.to(dtype=ST_DTYPES[task.out_dtype].torch).cpu())]


def distinct_sources(position: Sequence[TensorTask]) -> list[tuple[int, str]]:
    """The source tensors a position reads, each once (in first-use order)."""
    return list(dict.fromkeys(s for t in position for s in t.sources))


def compute_position(
    tasks: Sequence[TensorTask], methods: Sequence[str], sources: SourceCache, device: str = "cpu", clock: PhaseClock | None = None
) -> list[Outputs]:
    """One output tensor position for every variant: ``tasks[i]`` under ``methods[i]``.

    Each source tensor is read once for the position; tasks with the same sources (and input
    transform) share one cast per compute dtype, and those with the same method and base too are
    computed together by the method's ``many`` form (a single variant: a plain call).
    ``clock`` gets this thread's CPU time: "quantize" for FP8, "merge" for the rest.
    """
    t0 = thread_cpu()
    quantized = PhaseClock()
    groups: dict[tuple, list[int]] = {}
    for i, (task, method) in enumerate(zip(tasks, methods)):
        groups.setdefault((task.sources, task.transform, task.compute_dtype, method, task.base_index), []).append(i)
    uses: dict[tuple, int] = {}  # cast inputs -> groups still to use them
    for key in groups:
        uses[key[:3]] = uses.get(key[:3], 0) + 1
    cast: dict[tuple, list[torch.Tensor]] = {}
    results: list[Outputs] = [[] for _ in tasks]
    for (srcs, transform, dtype, method, base_index), idx in groups.items():
        inputs_key = (srcs, transform, dtype)
        if inputs_key not in cast:
            cast[inputs_key] = load_inputs(tasks[idx[0]], sources, device, ST_DTYPES[dtype].torch)
        inputs = cast[inputs_key]
        outs = get_method(method).call_many(
            inputs, base_index, [task_params(tasks[i]) for i in idx], [task_generator(tasks[i], device) for i in idx]
        )
        for i, out in zip(idx, outs):
            results[i] = finish_tensor(tasks[i], out, inputs, sources, quantized)
        del outs, inputs
        uses[inputs_key] -= 1
        if not uses[inputs_key]:
            del cast[inputs_key]  # memory: only the casts still needed are held
    for m, name in distinct_sources(tasks):
        sources[m].release(name)
    if clock is not None:
        q = quantized.seconds["quantize"]
        clock.add("quantize", q)
        clock.add("merge", thread_cpu() - t0 - q)
    return results


def _is_oom(e: BaseException) -> bool:
    # CPU allocation failures surface as a plain RuntimeError from c10's allocator.
    return (
        isinstance(e, (torch.OutOfMemoryError, MemoryError))
        or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
        or (isinstance(e, OSError) and e.errno == errno.ENOMEM)  # mmap of an input
    )


@contextmanager
def oom_names(shard: str, tensor: str):
    """Turn an allocation failure into a ResourceError naming the shard and tensor."""
    try:
        yield
    except BaseException as e:
        if _is_oom(e):
            raise ResourceError(f"shard {shard}: out of memory merging tensor {tensor!r}") from None
        raise


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 1


@contextmanager
def deterministic_threads():
    """One intra-op thread per torch call while any caller in this process is inside.

    A reduction's result (a slerp dot product, a norm, a sum of magnitudes) depends on how it is
    split between threads. With one thread per op, a tensor's bits are the same whether it is
    merged in this process, in a one-CPU Ray actor or on another node of the same CPU kind;
    parallelism comes from merging several tensors (or shards) at once instead.

    torch keeps the setting per thread, and a new thread takes the process-wide value when it
    first computes; so every entering thread pins its own, the process-wide value stays at one
    while any caller is inside (threads a pool starts meanwhile compute with one), and the old
    value returns when the last caller leaves (several threads, e.g. the driver's helpers, may
    enter and leave at different times).
    """
    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        if _threads_users == 0 or torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)
