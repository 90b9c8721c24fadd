"""Executing shard tasks: read sources lazily, merge, optionally quantize, stream to disk.

This is the one place tensors are computed. The single-process path (:func:`run_plan_local`) and
the Ray actors (``mergeserve.cluster``) both call :func:`run_shard`, so their outputs are equal
bit for bit. Memory is bounded by one output tensor and its inputs: sources are mmap views of the
page cache, and each merged tensor is written and dropped before the next is computed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergeserve.errors import InputError, ResourceError
from mergeserve.merge.methods.registry import get_method
from mergeserve.merge.plan import MergePlan, ModelInput, ShardTask, TensorTask
from mergeserve.merge.quantize import FP8_BLOCK, quantize_fp8_block
from mergeserve.merge.reader import ST_DTYPES, ModelFiles
from mergeserve.merge.writer import ShardWriter


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str


@dataclass(frozen=True)
class ShardResult:
    index: int
    filename: str
    tensors: tuple[TensorRecord, ...]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int  # bytes, of the process that ran it
    worker: str = "local"


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep large temporaries on glibc's heap instead of fresh mmaps (once per process).

    By default glibc serves every allocation over ~128 KB-32 MB with its own mmap and returns it
    with munmap, so each float32 chunk of a merge costs page faults and zeroing in the kernel:
    measured here, that made slerp 2-4x slower (half its time in sys). Raising the mmap and trim
    thresholds lets freed chunks be reused. Peak memory is unchanged: it is still bounded by the
    largest tensor's temporaries, which are now kept for reuse rather than returned.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SourceCache:
    """Open :class:`ModelFiles` per model, reused across shards in one process."""

    def __init__(self, models: Sequence[ModelInput], allow_pickle: bool = False):
        self.models = models
        self.allow_pickle = allow_pickle
        self._files: dict[int, ModelFiles] = {}
        self._lock = threading.Lock()

    def __getitem__(self, i: int) -> ModelFiles:
        with self._lock:
            f = self._files.get(i)
            if f is None:
                m = self.models[i]
                f = self._files[i] = ModelFiles(m.path, allow_pickle=self.allow_pickle, label=m.ref)
            return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def load_inputs(task: TensorTask, sources: SourceCache, device: str = "cpu", dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The task's source tensors, shape-checked and cast to its compute dtype on ``device``."""
    dtype = dtype or ST_DTYPES[task.compute_dtype][0]
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


def finish_tensor(task: TensorTask, out: torch.Tensor, inputs: Sequence[torch.Tensor], sources: SourceCache) -> list[tuple[str, torch.Tensor]]:
    """Check a merged tensor for NaN/Inf, then quantize or cast it: [(name, tensor)] on CPU."""
    # NaN/Inf anywhere make the sum non-finite; the sum is ~100x cheaper than isfinite().all(),
    # which only runs, to find the culprit, when the sum is not finite.
    if out.is_floating_point() and not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        for (m, name), t in zip(task.sources, inputs):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"model {sources.models[m].ref}: tensor {name!r} contains NaN or Inf")
        raise InputError(f"tensor {task.name!r}: the merge produced NaN or Inf (check the method's parameters)")
    if task.quantize == FP8_BLOCK:
        q, s = quantize_fp8_block(out)
        return [(task.name, q.cpu()), (task.scale_name, s.cpu())]
    return [(task.name, out.to(dtype=ST_DTYPES[task.out_dtype][0]).cpu())]


def compute_tensor(task: TensorTask, method: str, sources: SourceCache, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Merge one output tensor; returns [(name, tensor)] (two entries for FP8: weight + scale)."""
    inputs = load_inputs(task, sources, device)
    out = get_method(method)(inputs, task.base_index, generator=task_generator(task, device), **task_params(task))
    result = finish_tensor(task, out, inputs, sources)
    del inputs, out
    for m, name in task.sources:
        sources[m].release(name)
    return result


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


def in_order(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, window: int, emit: Callable[[object, Future], None]) -> None:
    """``fn(item)`` on ``pool``, at most ``window`` in flight, each handed to ``emit(item, future)``
    in the order of ``items`` (so outputs are written in plan order while later ones compute)."""
    pending: deque[tuple[object, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, window):
                emit(*pending.popleft())
        while pending:
            emit(*pending.popleft())
    finally:
        for _, f in pending:
            f.cancel()


@contextmanager
def deterministic_threads():
    """One intra-op thread per torch call while merging, restored afterwards.

    A reduction's result (a slerp dot product, a norm, a sum of magnitudes) depends on how it is
    split between threads. With one thread per op, a tensor's bits are the same whether it is
    merged in this process, in a one-CPU Ray actor or on another node of the same CPU kind;
    parallelism comes from merging several tensors (or shards) at once instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_shard(
    plan: MergePlan,
    shard: ShardTask,
    out_dir: str | Path,
    *,
    sources: SourceCache | None = None,
    device: str = "cpu",
    on_tensor: Callable[[int], None] | None = None,
    worker: str = "local",
    threads: int = 1,
) -> ShardResult:
    """Compute every tensor of ``shard`` and write ``out_dir/shard.filename`` (via a .tmp file).

    ``threads`` tensors are merged at once (each single-threaded) and written in plan order.
    """
    t0 = time.perf_counter()
    tune_malloc()
    own = sources is None
    sources = sources or SourceCache(plan.models)
    final = Path(out_dir) / shard.filename
    tmp = final.with_name(final.name + ".tmp")
    entries = [e for t in shard.tensors for e in t.outputs()]
    writer = ShardWriter(tmp, entries)

    def emit(task: TensorTask, future: Future) -> None:
        with oom_names(shard.filename, task.name):
            outs = future.result()
        for name, t in outs:
            writer.write(name, t)
        if on_tensor:
            on_tensor(task.bytes_out)

    try:
        with deterministic_threads(), ThreadPoolExecutor(max(1, threads), thread_name_prefix="merge") as pool:
            in_order(pool, lambda task: compute_tensor(task, plan.method, sources, device), shard.tensors, threads, emit)
        hashes = writer.close()
        os.replace(tmp, final)
    except BaseException:
        writer.abort()
        raise
    finally:
        if own:
            sources.close()
    records = tuple(TensorRecord(n, tuple(s), d, hashes[n]) for n, d, s in entries)
    return ShardResult(
        shard.index, shard.filename, records, shard.bytes_read, shard.bytes_written,
        time.perf_counter() - t0, peak_rss_bytes(), worker,
    )
