"""Units of distributed work smaller than an output shard: runs of whole tensors of one shard.

``--out-shard-size`` decides the output files (5 GB by default, so a 1B model is one file), but a
single file per worker would leave all other workers idle. The driver therefore cuts each shard
into *parts* (consecutive tensors, a few per worker), creates the shard's ``.tmp`` file at its
final size with its header (the plan knows every tensor's offset), and any worker (a Ray actor,
or the driver itself while Ray starts) merges a part and writes its tensors at their offsets.
When every part of a shard is in, the driver renames the ``.tmp`` file into place and then writes
the shard's record (tensor digests, and the digest of the sources its parts read) for
``--resume``: a record on disk still implies a complete shard, and an interrupted shard is redone
whole. A retried part (its actor was killed)
rewrites the same bytes: every tensor is a deterministic function of the plan.

A part belongs to a :class:`~mergeserve.merge.multi.Batch`: one plan, or several plans of one
output layout (independent stages of a multi-stage recipe) whose tensors are merged position by
position from one read of their sources, each plan's into its own directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergeserve.merge.execute import SourceCache
from mergeserve.merge.executor import Executor, ShardResult, TensorRecord, sources_digest, tensor_records
from mergeserve.merge.memory import peak_rss_bytes
from mergeserve.merge.multi import Batch, position_bytes
from mergeserve.merge.phases import summed
from mergeserve.merge.plan import ShardTask
from mergeserve.merge.readahead import Key
from mergeserve.merge.resume import write_done_record
from mergeserve.merge.writer import ShardLayout, SlotWriter, create_sized, tmp_path

PARTS_PER_WORKER = 16
MIN_PART_BYTES = 32 << 20


@dataclass(frozen=True)
class Part:
    """Tensors ``start`` .. ``stop - 1`` of shard ``shard`` (indices into ``ShardTask.tensors``)."""

    shard: int
    start: int
    stop: int
    bytes_written: int


@dataclass(frozen=True)
class PartResult:
    part: Part
    tensors: tuple[tuple[TensorRecord, ...], ...]  # per plan of the batch
    seconds: float
    peak_rss: int  # bytes, of the process that merged it
    worker: str
    bytes_read: int = 0  # source bytes read: each distinct source tensor once
    digests: dict[Key, str] = field(default_factory=dict)  # of each source tensor it read (numbered in the batch's models)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds by phase
    read_wait: float = 0.0  # seconds its merge thread waited for reads


def split_parts(shards: Sequence[ShardTask], workers: int) -> list[Part]:
    """Cut shards into parts of about ``total / (workers * PARTS_PER_WORKER)`` bytes (whole tensors,
    at least MIN_PART_BYTES unless a shard is smaller), in plan order."""
    total = sum(s.bytes_written for s in shards)
    target = max(MIN_PART_BYTES, total // max(1, workers * PARTS_PER_WORKER))
    parts = []
    for s in shards:
        start, size = 0, 0
        for i, t in enumerate(s.tensors):
            size += t.bytes_out
            if size >= target or i == len(s.tensors) - 1:
                parts.append(Part(s.index, start, i + 1, size))
                start, size = i + 1, 0
    return parts


def prepare_shard(out_dir: str | Path, shard: ShardTask) -> None:
    """Create the shard's ``.tmp`` file (header, full size) for parts to fill in."""
    create_sized(tmp_path(Path(out_dir) / shard.filename), ShardLayout(shard.outputs()))


def run_part(
    batch: Batch, part: Part, out_dirs: Sequence[str | Path], *, sources: SourceCache, device: str = "cpu",
    worker: str = "local", should_stop: Callable[[], bool] | None = None, direct: bool = True,
) -> PartResult:
    """Merge the tensors of ``part`` for every plan of ``batch`` and write them into each plan's
    shard ``.tmp`` file (plan ``k``'s in ``out_dirs[k]``); ``sources`` reads the batch's models.

    ``should_stop`` is asked after each tensor: if it says so, the result covers only the tensors
    done so far (``result.part.stop`` is then smaller than ``part.stop``) and the caller hands the
    rest to someone else.
    """
    t0 = time.perf_counter()
    layout = batch.shards[part.shard]
    tasks = layout.tensors[part.start : part.stop]
    first = sum(len(t.outputs()) for t in layout.tensors[: part.start])
    count = sum(len(t.outputs()) for t in tasks)
    slots = ShardLayout(layout.outputs()).tensors[first : first + count]
    positions = batch.positions(part.shard, part.start, part.stop)
    writers = []
    try:
        for d in out_dirs:
            writers.append(SlotWriter(tmp_path(Path(d) / layout.filename), slots, direct=direct))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    outcome = Executor(sources, device).run(batch.methods, positions, writers, label=layout.filename, should_stop=should_stop)
    done = outcome.done
    if done < len(tasks):
        part = Part(part.shard, part.start, part.start + done, sum(t.bytes_out for t in tasks[:done]))
    entries = [e for t in tasks[:done] for e in t.outputs()]
    read = sum(position_bytes(sources, p) for p in positions[:done])
    return PartResult(
        part, tuple(tensor_records(entries, h) for h in outcome.hashes), time.perf_counter() - t0, peak_rss_bytes(), worker,
        read, outcome.digests, outcome.cpu, outcome.read_wait,
    )


class ShardAssembler:
    """Collects finished parts; completes a shard (rename, then record) for every plan of the
    batch once all its parts are in."""

    def __init__(self, batch: Batch, parts: Sequence[Part], out_dirs: Sequence[str | Path]):
        self.batch = batch
        self.out_dirs = [Path(d) for d in out_dirs]
        self._missing: dict[int, set[int]] = {}  # shard -> indices of tensors not merged yet
        for p in parts:
            self._missing.setdefault(p.shard, set()).update(range(p.start, p.stop))
        self._got: dict[int, list[PartResult]] = {}
        self.results: list[list[ShardResult]] = [[] for _ in batch.plans]  # per plan
        self.bytes_read = 0

    def add(self, res: PartResult) -> list[ShardResult] | None:
        """Record ``res``; returns the shard's ShardResult per plan if this was its last part."""
        p = res.part
        missing = self._missing[p.shard]
        if not missing.issuperset(range(p.start, p.stop)):
            raise RuntimeError(f"part {p} reported twice")  # a bug in the dispatcher, not user input
        missing.difference_update(range(p.start, p.stop))
        self._got.setdefault(p.shard, []).append(res)
        self.bytes_read += res.bytes_read
        if missing:
            return None
        got = sorted(self._got.pop(p.shard), key=lambda r: r.part.start)
        workers = ",".join(sorted({r.worker for r in got}))
        seconds, rss = sum(r.seconds for r in got), max(r.peak_rss for r in got)
        digests = {key: d for r in got for key, d in r.digests.items()}
        cpu, read_wait = summed(r.cpu for r in got), sum(r.read_wait for r in got)
        done = []
        for k, (plan, out_dir) in enumerate(zip(self.batch.plans, self.out_dirs)):
            shard = plan.shards[p.shard]
            final = out_dir / shard.filename
            os.replace(tmp_path(final), final)
            records = tuple(t for r in got for t in r.tensors[k])
            own = sources_digest(plan.models, self.batch.plan_digests(k, shard.tensors, digests))
            result = ShardResult(
                shard.index, shard.filename, records, shard.bytes_read, shard.bytes_written, seconds, rss, workers, own,
                cpu if k == 0 else {}, read_wait if k == 0 else 0.0,  # the work was done once, for the whole batch
            )
            write_done_record(out_dir, result)
            self.results[k].append(result)
            done.append(result)
        return done

    @property
    def done(self) -> bool:
        return not any(self._missing.values())
