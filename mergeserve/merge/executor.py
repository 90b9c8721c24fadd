"""The one loop that computes merged tensors and writes them: :class:`Executor`.

A whole shard (:func:`run_shard`: ``mergeserve merge --local``), a part of a shard (a Ray actor or
the driver's helper thread, :func:`mergeserve.cluster.parts.run_part`) and a shard of every
plan of a batch (:func:`mergeserve.merge.multi.run_shard_many`) all run through
:meth:`Executor.run`, so their tensors are equal bit for bit.

The executor walks *positions* in plan order: position ``i`` is one output tensor, given as one
:class:`~mergeserve.merge.plan.TensorTask` per variant (one output layout), computed by
:func:`~mergeserve.merge.execute.compute_position`. Up to ``threads`` positions are computed at
once (each torch op single-threaded, see :func:`~mergeserve.merge.execute.deterministic_threads`),
and their tensors are handed in plan order to one :class:`Sink` per variant: a file writer (which
hashes and stores on its own thread) or a dict in memory. Sources are read through a
:class:`~mergeserve.merge.execute.SourceCache`; since the executor knows every position before it
starts, a reader that fetches sources ahead of the math, in file order, fits in front of it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from mergeserve.merge.execute import (
    Outputs,
    SourceCache,
    compute_position,
    deterministic_threads,
    oom_names,
    peak_rss_bytes,
    tune_malloc,
)
from mergeserve.merge.plan import MergePlan, ShardTask, TensorTask
from mergeserve.merge.writer import ShardWriter, tmp_path

Entries = Sequence[tuple[str, str, tuple[int, ...]]]  # (name, dtype code, shape), in file order
T = TypeVar("T")


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

    @classmethod
    def from_dict(cls, raw: dict) -> ShardResult:
        """The inverse of ``dataclasses.asdict`` (a record read back from JSON)."""
        tensors = tuple(TensorRecord(t["name"], tuple(t["shape"]), t["dtype"], t["sha256"]) for t in raw["tensors"])
        return cls(**{**raw, "tensors": tensors})


def tensor_records(entries: Entries, hashes: dict[str, str]) -> tuple[TensorRecord, ...]:
    return tuple(TensorRecord(name, tuple(shape), dtype, hashes[name]) for name, dtype, shape in entries)


class Sink(Protocol):
    """Where the executor hands one variant's tensors, in plan order."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self, partial: bool = False) -> dict[str, str]:
        """Finish (``partial``: after only the first tensors); returns {name: sha256} where hashed."""
        ...

    def abort(self) -> None: ...


class MemorySink:
    """Keeps the tensors in :attr:`tensors` ({name: tensor}, nothing written or hashed)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor

    def close(self, partial: bool = False) -> dict[str, str]:
        return {}

    def abort(self) -> None:
        self.tensors.clear()


def in_order(fn: Callable[[int], T], count: int, threads: int, emit: Callable[[int, Callable[[], T]], bool]) -> None:
    """``fn(i)`` for ``i`` in ``range(count)``, ``threads`` at a time, each handed to ``emit(i,
    result)`` in order (``result()`` returns ``fn(i)`` or raises what it raised). Stops early when
    ``emit`` returns True. With one thread, ``fn`` runs on the caller's thread."""
    if threads <= 1:
        for i in range(count):
            if emit(i, lambda i=i: fn(i)):
                return
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
        pending: deque = deque()
        try:
            for i in range(count):
                pending.append((i, pool.submit(fn, i)))
                if len(pending) >= threads and emit(*_result_of(pending.popleft())):
                    return
            while pending:
                if emit(*_result_of(pending.popleft())):
                    return
        finally:
            for _, f in pending:
                f.cancel()


def _result_of(item):
    i, future = item
    return i, future.result


@dataclass
class Executor:
    """Computes positions with ``sources`` on ``device``, ``threads`` at a time."""

    sources: SourceCache
    device: str = "cpu"
    threads: int = 1

    def run(
        self,
        methods: Sequence[str],
        positions: Sequence[Sequence[TensorTask]],
        sinks: Sequence[Sink],
        *,
        label: str,
        on_position: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[int, list[dict[str, str]]]:
        """Compute ``positions`` in order; variant ``v`` (``positions[i][v]`` merged by ``methods[v]``)
        goes to ``sinks[v]``. ``label`` (the shard's file name) names the shard in errors.

        ``on_position(i)`` runs once position ``i`` is handed to the sinks; ``should_stop`` is asked
        after each position but the last, and stops the run there when it says so. Returns (positions
        done, each sink's hashes); on any error every sink is aborted and the error re-raised.
        """
        tune_malloc()
        done = 0

        def compute(i: int) -> list[Outputs]:
            return compute_position(positions[i], methods, self.sources, self.device)

        def emit(i: int, result: Callable[[], list[Outputs]]) -> bool:
            nonlocal done
            with oom_names(label, positions[i][0].name):
                outs = result()
            for sink, pairs in zip(sinks, outs):
                for name, t in pairs:
                    sink.write(name, t)
            del outs
            done += 1
            if on_position is not None:
                on_position(i)
            return should_stop is not None and done < len(positions) and should_stop()

        try:
            with deterministic_threads():
                in_order(compute, len(positions), self.threads, emit)
            return done, [s.close(partial=done < len(positions)) for s in sinks]
        except BaseException:
            for s in sinks:
                s.abort()
            raise


@contextmanager
def sources_for(plan: MergePlan, sources: SourceCache | None) -> Iterator[SourceCache]:
    """``sources``, or a cache of ``plan``'s inputs opened (and closed) for this call."""
    if sources is not None:
        yield sources
        return
    own = SourceCache(plan)
    try:
        yield own
    finally:
        own.close()


def commit_shard(shard: ShardTask, out_dir: str | Path, hashes: dict[str, str], seconds: float, worker: str) -> ShardResult:
    """Rename the shard's finished ``.tmp`` file into place; its result."""
    final = Path(out_dir) / shard.filename
    try:
        os.replace(tmp_path(final), final)
    except BaseException:
        tmp_path(final).unlink(missing_ok=True)
        raise
    records = tensor_records(shard.outputs(), hashes)
    return ShardResult(shard.index, shard.filename, records, shard.bytes_read, shard.bytes_written, seconds, peak_rss_bytes(), worker)


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

    ``threads`` tensors are merged at once (each single-threaded) and written in plan order;
    ``on_tensor`` gets each tensor's output bytes once written.
    """
    t0 = time.perf_counter()
    report = None if on_tensor is None else (lambda i: on_tensor(shard.tensors[i].bytes_out))
    with sources_for(plan, sources) as src:
        writer = ShardWriter(tmp_path(Path(out_dir) / shard.filename), shard.outputs())
        _, (hashes,) = Executor(src, device, threads).run(
            [plan.method], [(t,) for t in shard.tensors], [writer], label=shard.filename, on_position=report
        )
    return commit_shard(shard, out_dir, hashes, time.perf_counter() - t0, worker)
