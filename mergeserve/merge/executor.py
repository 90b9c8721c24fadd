"""The one loop that computes merged tensors and writes them: :class:`Executor`.

A whole shard (:func:`run_shard`: ``mergeserve merge`` in one process), a part of a shard (a Ray actor or
the driver's helper thread, :func:`mergeserve.cluster.parts.run_part`) and a shard of every
plan of a batch (:func:`mergeserve.merge.multi.run_shard_many`) all run through
:meth:`Executor.run`, so their tensors are equal bit for bit.

The executor walks *positions* in plan order: position ``i`` is one output tensor, given as one
:class:`~mergeserve.merge.plan.TensorTask` per variant (one output layout), computed by
:func:`~mergeserve.merge.execute.compute_position`. Up to ``threads`` positions are computed at
once (each torch op single-threaded, see :func:`~mergeserve.merge.execute.deterministic_threads`),
and their tensors are handed in plan order to one :class:`Sink` per variant: a file writer (which
hashes and stores on its own thread) or a dict in memory. Sources come from a
:class:`~mergeserve.merge.readahead.ReadAhead` over the positions: its threads read the sources in
order ahead of the math (at most its budget in memory), so the disk reads while the math runs and
the writer writes. Each run reports the CPU time of every phase and a digest of every source
tensor it read (:class:`Outcome`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from mergeserve.merge.digest import new_digest
from mergeserve.merge.execute import (
    Outputs,
    SourceCache,
    compute_position,
    deterministic_threads,
    distinct_sources,
    oom_names,
)
from mergeserve.merge.memory import peak_rss_bytes, tune_malloc
from mergeserve.merge.phases import PhaseClock
from mergeserve.merge.plan import MergePlan, ModelInput, ShardTask, TensorTask
from mergeserve.merge.readahead import Key, ReadAhead
from mergeserve.merge.writer import ShardLayout, SlotWriter, tmp_path

Entries = Sequence[tuple[str, str, tuple[int, ...]]]  # (name, dtype code, shape), in file order
T = TypeVar("T")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    digest: str  # of the stored bytes (see merge.digest)


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
    sources_digest: str = ""  # of every source tensor it read (see sources_digest), for --resume
    cpu: dict = field(default_factory=dict)  # CPU-seconds by phase (merge.phases)
    read_wait: float = 0.0  # seconds its merge threads waited for reads (see Outcome)

    @classmethod
    def from_dict(cls, raw: dict) -> ShardResult:
        """The inverse of ``dataclasses.asdict`` (a record read back from JSON)."""
        tensors = tuple(TensorRecord(t["name"], tuple(t["shape"]), t["dtype"], t["digest"]) for t in raw["tensors"])
        return cls(**{**raw, "tensors": tensors})


def tensor_records(entries: Entries, hashes: dict[str, str]) -> tuple[TensorRecord, ...]:
    return tuple(TensorRecord(name, tuple(shape), dtype, hashes[name]) for name, dtype, shape in entries)


def sources_digest(models: Sequence[ModelInput], digests: dict[Key, str]) -> str:
    """One digest of the source tensors a shard read: each (model, tensor name, digest of its
    bytes), sorted, so that it does not depend on how the shard was cut into parts or read."""
    h = new_digest()
    for (m, name), d in sorted(digests.items()):
        h.update(f"{m}\0{models[m].ref}\0{name}\0{d}\n".encode())
    return h.hexdigest()


def position_keys(positions: Sequence[Sequence[TensorTask]]) -> list[tuple[Key, ...]]:
    """The source tensors of each position, each once (the variants of a batch may read different models)."""
    return [tuple(distinct_sources(p)) for p in positions]


def shard_keys(shard: ShardTask) -> list[tuple[Key, ...]]:
    """The source tensors of each position of a shard merged alone."""
    return position_keys([(t,) for t in shard.tensors])


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Executor.run` did: positions done, each sink's {name: digest}, CPU-seconds by
    phase, the digest of every source tensor of the positions done, and how long the merge
    threads waited for reads (seconds, summed over them: near zero unless the disk is the bound)."""

    done: int
    hashes: list[dict[str, str]]
    cpu: dict[str, float]
    digests: dict[Key, str]
    read_wait: float = 0.0


class Sink(Protocol):
    """Where the executor hands one variant's tensors, in plan order."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self, partial: bool = False) -> dict[str, str]:
        """Finish (``partial``: after only the first tensors); returns {name: digest} where hashed."""
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
    ``emit`` returns True. With one thread, ``fn`` runs on the caller's thread.

    Up to ``2 * threads`` positions are submitted at once, so that a thread done with a small
    tensor takes the next one while a large one ahead of it is still being merged (with only
    ``threads`` submitted, it waited for the large one to be handed on: a tenth of the wall time
    of a 7B merge on two threads).
    """
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
                if len(pending) >= 2 * threads and emit(*_result_of(pending.popleft())):
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
        reads: ReadAhead | None = None,
        first: int = 0,
    ) -> Outcome:
        """Compute ``positions`` in order; variant ``v`` (``positions[i][v]`` merged by ``methods[v]``)
        goes to ``sinks[v]``. ``label`` (the shard's file name) names the shard in errors.

        ``on_position(i)`` runs once position ``i`` is handed to the sinks; ``should_stop`` is asked
        after each position but the last, and stops the run there when it says so. On any error
        every sink is aborted and the error re-raised.

        Sources come from ``reads`` where given (a read-ahead over several runs' positions, these
        being its positions ``first`` ...: it reads on across the runs' boundaries), else from a
        read-ahead of this run's own.
        """
        tune_malloc()
        done = 0
        clock = PhaseClock()
        keys = position_keys(positions)
        own = reads is None
        if reads is None:
            reads = ReadAhead(self.sources, keys)
        before = (dict(reads.clock.seconds), reads.waited)

        def compute(i: int) -> list[Outputs]:
            try:
                outs = compute_position(positions[i], methods, reads.view(first + i), self.device, clock)  # type: ignore[arg-type]
                # A method may hand back a source unchanged (passthrough): it must outlive the read buffer.
                return [[(n, t.clone() if reads.owns(t) else t) for n, t in o] for o in outs]
            finally:
                reads.finish(first + i)

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
            try:
                with deterministic_threads():
                    in_order(compute, len(positions), self.threads, emit)
            finally:
                if own:
                    reads.close()
            hashes = [s.close(partial=done < len(positions)) for s in sinks]
        except BaseException:
            for s in sinks:
                s.abort()
            raise
        clock.add_all({k: v - before[0].get(k, 0.0) for k, v in reads.clock.seconds.items()})  # the reader's work meanwhile
        for s in sinks:
            clock.add_all(getattr(s, "cpu", {}))
        digests = {k: reads.digests[k] for ks in keys[:done] for k in ks}
        return Outcome(done, hashes, clock.as_dict(), digests, reads.waited - before[1])


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


def commit_shard(
    plan: MergePlan, shard: ShardTask, out_dir: str | Path, outcome: Outcome, v: int, seconds: float, worker: str
) -> ShardResult:
    """Rename the shard's finished ``.tmp`` file into place; its result (``v``: which sink's hashes)."""
    final = Path(out_dir) / shard.filename
    try:
        os.replace(tmp_path(final), final)
    except BaseException:
        tmp_path(final).unlink(missing_ok=True)
        raise
    records = tensor_records(shard.outputs(), outcome.hashes[v])
    return ShardResult(
        shard.index, shard.filename, records, shard.bytes_read, shard.bytes_written, seconds, peak_rss_bytes(), worker,
        sources_digest(plan.models, outcome.digests), outcome.cpu, outcome.read_wait,
    )


def shard_writer(path: str | Path, shard: ShardTask, *, direct: bool = True) -> SlotWriter:
    """A writer of every tensor of ``shard`` into a new file at ``path``: pre-sized, filled with
    O_DIRECT writes (filling fresh page-cache pages costs more CPU than the merge math on a small
    machine, and a merge's output is not read back by it). ``direct=False``: through the page
    cache, for an output that is read back at once (a multi-stage recipe's intermediate stage)."""
    return SlotWriter.whole_file(path, ShardLayout(shard.outputs()), direct=direct)


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
    reads: ReadAhead | None = None,
    first: int = 0,
) -> ShardResult:
    """Compute every tensor of ``shard`` and write ``out_dir/shard.filename`` (via a .tmp file).

    ``threads`` tensors are merged at once (each single-threaded) and written in plan order;
    ``on_tensor`` gets each tensor's output bytes once written. ``reads``, ``first``: see
    :meth:`Executor.run`.
    """
    t0 = time.perf_counter()
    report = None if on_tensor is None else (lambda i: on_tensor(shard.tensors[i].bytes_out))
    with sources_for(plan, sources) as src:
        writer = shard_writer(tmp_path(Path(out_dir) / shard.filename), shard)
        outcome = Executor(src, device, threads).run(
            [plan.method], [(t,) for t in shard.tensors], [writer], label=shard.filename, on_position=report, reads=reads, first=first
        )
    return commit_shard(plan, shard, out_dir, outcome, 0, time.perf_counter() - t0, worker)
