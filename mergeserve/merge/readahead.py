"""Reading a merge's source tensors ahead of the math, at the disk's speed: :class:`ReadAhead`.

A merge of checkpoints larger than the page cache is bound by the disk: it must read every input
byte once and write the output once, and everything else (the merge math, hashing, quantizing)
can hide under that I/O, if the disk never waits for the CPU. The executor knows, before it
starts, every source tensor it will read and in which order (its positions), so:

- ``READ_THREADS`` reader threads read the sources in the executor's order, ahead of the math,
  holding at most ``budget`` bytes at once (see :func:`read_budget`).
  A plan walks the layers in the order checkpoints store them, so each input is read in file
  order, tensor by tensor (tens of MB each: an occasional step back costs nothing). Two reads in
  flight keep the disk busy where one leaves it idle between requests (on this project's virtio
  disk: 0.93 GB/s with one 16 MB read at a time, 1.49 GB/s with two, 1.46 with four).
- Tensors are read with ``pread`` into a reused, page-aligned arena (borrowed from the
  :class:`~mergeserve.merge.execute.SourceCache`, so it is filled once per process). A tensor not
  in the page cache (``mincore``) is read with ``O_DIRECT``: no page-cache pages are filled (a
  buffered read cost 0.8 CPU-s/GB in the kernel here, against 0.07 direct) and none are evicted,
  so the cache never drops the next tensor to keep the last one, and what else is cached stays.
  A tensor already cached is copied from the cache (0.14 CPU-s/GB).
- Never through the files' mappings: a mapped file that shrinks, or a disk that fails, kills the
  process with SIGBUS, where a read returns short or fails and the error names the file.
- Every tensor's bytes are digested (:mod:`.digest`) as they arrive: :attr:`digests`, the
  fingerprint of what a shard read, which ``--resume`` compares before reusing the shard.

The consumer asks for position ``i``'s tensors with :meth:`view` (what
:func:`~mergeserve.merge.execute.compute_position` reads through) and hands them back with
:meth:`finish`. A tensor a position reads that is not among its planned sources (an input
transform reading another tensor) is read through the model's :class:`ModelFiles`, as without
read-ahead; so are tensors of pickle checkpoints, which are in memory already.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeserve.errors import InputError
from mergeserve.merge.digest import digest_of, new_digest
from mergeserve.merge.phases import PhaseClock, thread_cpu
from mergeserve.merge.reader import ST_DTYPES, ModelFiles, TensorInfo
from mergeserve.merge.untrusted import open_regular

Key = tuple[int, str]  # (model index in the plan, tensor name)

# At most this much is held: four 7B MLP positions (2 x 117 MB each), two being merged, two read
# ahead; a few tenths of a second of disk time, enough to ride over the merge's pauses.
READ_AHEAD_BYTES = 1 << 30
# Less for smaller models: this many of their typical (90th percentile) positions. Every byte of
# the arena costs a page fault the first time (a quarter of a CPU-second per GiB here).
AHEAD_POSITIONS = 8
READ_THREADS = 2
READ_CHUNK = 16 << 20  # bytes per read request (16 and 64 MB read equally fast here; 16 holds less)
ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (covers 512-byte and 4 KiB devices)


def _up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


class Arena:
    """One page-aligned anonymous mapping, handed out in regions oldest-first (a ring).

    Regions are freed in any order; space is reused once every older region is freed too, which
    suits a consumer that finishes positions about in order.
    """

    def __init__(self, capacity: int):
        self.capacity = _up(capacity)
        self.map = mmap.mmap(-1, self.capacity)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:  # fewer page faults filling it; where THP is off this is a no-op
                self.map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        c = ctypes.c_char.from_buffer(self.map)
        self.base = ctypes.addressof(c)
        del c  # its hold on the mapping: close() could not unmap it otherwise
        self._live: deque[list] = deque()  # [start, end, freed], oldest first

    def alloc(self, n: int) -> int | None:
        """The offset of a free region of ``n`` bytes (rounded up to ALIGN), or None."""
        n = _up(n)
        if not self._live:
            at = 0 if n <= self.capacity else None
        else:
            head, tail = self._live[0][0], self._live[-1][1]
            if self._live[-1][0] >= head:  # not wrapped: free at [tail, capacity) and [0, head)
                at = tail if self.capacity - tail >= n else (0 if head >= n else None)
            else:  # wrapped: free at [tail, head)
                at = tail if head - tail >= n else None
        if at is not None:
            self._live.append([at, at + n, False])
        return at

    def free(self, at: int) -> None:
        for r in self._live:
            if r[0] == at and not r[2]:
                r[2] = True
                break
        while self._live and self._live[0][2]:
            self._live.popleft()

    def owns(self, t: torch.Tensor) -> bool:
        p = t.untyped_storage().data_ptr()
        return self.base <= p < self.base + self.capacity

    def reset(self) -> None:
        """Every region free (its user is done with all of them)."""
        self._live.clear()

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a tensor still views it; the mapping goes with the last one


def read_budget(sizes: Sequence[int]) -> int:
    """Bytes a read-ahead over positions of ``sizes`` bytes may hold: AHEAD_POSITIONS typical
    positions, at most READ_AHEAD_BYTES, and at least the largest position (it must fit)."""
    if not sizes:
        return 0
    typical = sorted(sizes)[int(0.9 * (len(sizes) - 1))]
    return max(min(READ_AHEAD_BYTES, AHEAD_POSITIONS * typical), max(sizes))


@dataclass(eq=False)
class _Slot:
    key: Key
    info: TensorInfo
    refs: int = 1  # positions claimed that read it and have not finished
    region: int | None = None  # arena offset, or None: used in place (a pickle's, an empty tensor)
    block: int | None = None  # the arena block it shares with the other new sources of its position
    direct: bool = False  # not in the page cache: read with O_DIRECT
    tensor: torch.Tensor | None = None
    loading: bool = True
    error: BaseException | None = None


class ReadAhead:
    """Reads ``positions[i]``'s source tensors (keys) ahead of their use, in order; see the module."""

    def __init__(self, sources, positions: Sequence[Sequence[Key]], *, budget: int | None = None, threads: int = READ_THREADS):
        self.sources = sources  # a SourceCache: sources[m] is model m's ModelFiles
        self._positions = [tuple(dict.fromkeys(keys)) for keys in positions]
        sizes = [sum(self._info(k).nbytes for k in keys) for keys in self._positions]
        self.budget = read_budget(sizes) if budget is None else max(budget, max(sizes, default=0))
        self.digests: dict[Key, str] = {}  # every tensor read, digested as it arrived
        self.clock = PhaseClock()  # "read" and "hash" CPU of the reader threads
        self.waited = 0.0  # seconds the consumers waited for reads, summed over their threads
        self._slots: dict[Key, _Slot] = {}
        self._held: dict[int, list[_Slot]] = {}  # position -> the slots it holds a reference to
        self._finished: set[int] = set()
        self._claimed = 0  # positions whose every key has a slot
        self._todo: deque[_Slot] = deque()  # slots to read, in order
        self._block_users: dict[int, int] = {}  # arena block -> slots in it not freed
        self._bytes = 0  # bytes of live slots
        self._arena: Arena | None = None
        self._lease = None  # the context that lends the arena (sources.arena)
        self._fds: dict[str, tuple[int, int | None]] = {}  # file -> (fd, O_DIRECT fd or None)
        self._spare: list = []  # O_DIRECT fds given up on, closed with the rest
        self._cond = threading.Condition()
        self._claim = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"read-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    # -- the consumer's side ------------------------------------------------------------------
    def view(self, pos: int) -> _PositionSources:
        """What position ``pos`` reads its sources through (``sources[m].get(name)``)."""
        return _PositionSources(self, pos)

    def get(self, pos: int, key: Key) -> torch.Tensor:
        """Source ``key`` of position ``pos``, once read (raises what reading it raised)."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._claimed > pos:
                    slot = self._slots[key]
                    if slot.error is not None:
                        raise slot.error
                    if not slot.loading:
                        assert slot.tensor is not None
                        self.waited += time.perf_counter() - t0
                        return slot.tensor
                self._cond.wait()

    def finish(self, pos: int) -> None:
        """Position ``pos`` is done with its sources (they may be freed)."""
        with self._cond:
            self._finished.add(pos)
            for slot in self._held.pop(pos, []):
                slot.refs -= 1
                if slot.refs == 0 and not slot.loading:
                    self._free(slot)
            self._cond.notify_all()

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in the arena (it must be copied to outlive :meth:`finish`)."""
        return self._arena is not None and self._arena.owns(t)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        for fd in [x for fds in self._fds.values() for x in fds] + self._spare:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        for slot in self._slots.values():
            if slot.region is None and not slot.loading:
                self._model(slot.key[0]).release(slot.key[1])
        self._slots.clear()
        if self._lease is not None:
            self._lease.__exit__(None, None, None)  # back to the sources' pool, for the next run
            self._lease = self._arena = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the readers' side --------------------------------------------------------------------
    def _model(self, m: int) -> ModelFiles:
        return self.sources[m]

    def _info(self, key: Key) -> TensorInfo:
        return self._model(key[0]).info(key[1])

    def _run(self) -> None:
        try:
            while (slot := self._next()) is not None:
                self._load(slot)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()

    def _next(self) -> _Slot | None:
        """The next slot to read: one of the position claimed last, or the next position's (claimed
        once the budget has room for all of its new sources); None when all are read."""
        with self._claim, self._cond:
            while True:
                if self._closed or self._error is not None:
                    return None
                if self._todo:
                    return self._todo.popleft()
                if self._claimed >= len(self._positions):
                    return None
                if not self._claim_next():
                    self._cond.wait()

    def _claim_next(self) -> bool:
        """Give every source of the next position a slot (one more user for those read already,
        new slots for the others, queued to be read), if there is room; whether it was done.

        A position's new sources get one block of the arena together: given piece by piece, the
        ring could hold the first piece where the second cannot fit beside it, and wait forever.
        """
        pos = self._claimed
        keys = [] if pos in self._finished else self._positions[pos]
        new = [k for k in keys if k not in self._slots]
        need = sum(self._info(k).nbytes for k in new)
        if self._bytes and self._bytes + need > self.budget:
            return False
        files = [self._model(k[0]) for k in new]
        spans = [0 if f.in_memory(k[1]) or not self._info(k).nbytes else self._span(self._info(k)) for f, k in zip(files, new)]
        block = None
        if sum(spans):
            if self._arena is None:
                self._lease = self.sources.arena(self.budget + 2 * ALIGN * max(len(k) for k in self._positions))
                self._arena = self._lease.__enter__()
            block = self._arena.alloc(sum(spans))
            if block is None:
                if self._bytes:
                    return False
                spans = [0] * len(spans)  # cannot happen (the arena holds the largest position): read in place
        at = block or 0
        for k, f, span in zip(new, files, spans):
            region = None if not span else at
            at += span
            slot = _Slot(k, self._info(k), refs=0, region=region, block=block if span else None, direct=span > 0 and not f.resident(k[1]))
            if slot.block is not None:
                self._block_users[block] = self._block_users.get(block, 0) + 1
            self._slots[k] = slot
            self._todo.append(slot)
        self._bytes += need
        for k in keys:
            slot = self._slots[k]
            slot.refs += 1
            self._held.setdefault(pos, []).append(slot)
        self._claimed += 1
        self._cond.notify_all()
        return True

    @staticmethod
    def _span(info: TensorInfo) -> int:
        """Arena bytes a tensor takes: its pages, for O_DIRECT reads."""
        return _up(info.end) - (info.start - info.start % ALIGN)

    def _free(self, slot: _Slot) -> None:
        del self._slots[slot.key]
        self._bytes -= slot.info.nbytes
        if slot.region is not None:
            slot.tensor = None
            self._block_users[slot.block] -= 1
            if not self._block_users[slot.block]:
                del self._block_users[slot.block]
                self._arena.free(slot.block)  # type: ignore[union-attr]
        elif slot.error is None:
            self._model(slot.key[0]).release(slot.key[1])

    def _load(self, slot: _Slot) -> None:
        t0 = thread_cpu()
        hashed = 0.0
        try:
            m, name = slot.key
            files = self._model(m)
            if slot.region is None:
                tensor = files.get(name)
                t1 = thread_cpu()
                self.digests[slot.key] = digest_of(files.raw(name))
                hashed = thread_cpu() - t1
            else:
                tensor, hashed = self._read_into_arena(slot, files)
            slot.tensor = tensor
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            slot.error = e
        self.clock.add("hash", hashed)
        self.clock.add("read", thread_cpu() - t0 - hashed)
        with self._cond:
            slot.loading = False
            if slot.error is not None:
                self._error = self._error or slot.error
            if slot.refs == 0:
                self._free(slot)
            self._cond.notify_all()

    def _fd(self, file: str, label: str, direct: bool) -> tuple[int, bool]:
        """An fd of ``file`` (with ``direct``: an O_DIRECT one where the filesystem allows it, e.g.
        not tmpfs); whether it is direct."""
        with self._cond:
            got = self._fds.get(file)
        if got is None:
            fd, dfd = _open(file, label), None
            if hasattr(os, "O_DIRECT"):
                dfd = _open(file, label)  # its own open file: a dup would share the O_DIRECT flag
                try:
                    fcntl.fcntl(dfd, fcntl.F_SETFL, fcntl.fcntl(dfd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError:
                    os.close(dfd)
                    dfd = None
            with self._cond:
                if file in self._fds:  # another reader opened it meanwhile
                    for x in (fd, dfd):
                        if x is not None:
                            os.close(x)
                got = self._fds.setdefault(file, (fd, dfd))
        fd, dfd = got
        return (dfd, True) if direct and dfd is not None else (fd, False)

    def _read_into_arena(self, slot: _Slot, files: ModelFiles) -> tuple[torch.Tensor, float]:
        """Read ``slot``'s bytes into its region, digesting them; (tensor, CPU-s spent hashing)."""
        info = slot.info
        label = f"model {files.label}: {Path(info.file).name}"
        fd, direct = self._fd(info.file, label, slot.direct)
        arena = self._arena
        assert arena is not None and slot.region is not None
        a = info.start - info.start % ALIGN if direct else info.start
        buf = memoryview(arena.map)[slot.region : slot.region + _up(info.end - a)]
        h, hashed, pos = new_digest(), 0.0, a
        try:
            while pos < info.end:
                n = min(READ_CHUNK, (_up(info.end) if direct else info.end) - pos)
                try:
                    got = os.preadv(fd, [buf[pos - a : pos - a + n]], pos)
                except OSError as e:
                    if direct and e.errno == errno.EINVAL:  # the device wants another alignment
                        buf.release()
                        self._no_direct(info.file)
                        return self._read_into_arena(slot, files)
                    raise InputError(f"{label}: read failed at byte {pos}: {e.strerror or e}") from None
                lo, hi = max(pos, info.start), min(pos + got, info.end)
                if hi > lo:
                    t = thread_cpu()
                    h.update(buf[lo - a : hi - a])
                    hashed += thread_cpu() - t
                pos += got
                if got < n and pos < info.end:
                    raise InputError(
                        f"{label}: ends at byte {pos}, inside tensor {slot.key[1]!r} (bytes {info.start}-{info.end}): "
                        "the file was truncated or replaced after planning"
                    )
        finally:
            buf.release()
        if slot.direct and not direct:  # read once through the cache, where O_DIRECT is refused: drop it
            os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_DONTNEED)
        self.digests[slot.key] = h.hexdigest()
        return self._tensor(slot, info.start - a), hashed

    def _no_direct(self, file: str) -> None:
        """Read ``file`` through the page cache from now on."""
        with self._cond:
            fd, dfd = self._fds[file]
            self._fds[file] = (fd, None)  # dfd stays open: another reader may be using it
            self._spare.append(dfd)

    def _tensor(self, slot: _Slot, skip: int) -> torch.Tensor:
        """The tensor in ``slot``'s region, whose bytes start ``skip`` bytes in."""
        info, arena = slot.info, self._arena
        assert arena is not None and slot.region is not None
        dtype, itemsize = ST_DTYPES[info.dtype]
        at = slot.region + skip
        if at % itemsize:  # data offsets that are not a multiple of the dtype's size: realign
            ctypes.memmove(arena.base + slot.region, arena.base + at, info.nbytes)
            at = slot.region
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": the arena is writable
            t = torch.frombuffer(arena.map, dtype=dtype, count=info.nbytes // itemsize, offset=at)
        return t.view(info.shape)


def _open(file: str, label: str) -> int:
    """A read-only fd of regular file ``file``."""
    with open_regular(file, label) as f:
        return os.dup(f.fileno())


class _PositionSources:
    """Sources as position ``pos`` sees them: ``[m].get(name)`` waits for the read-ahead."""

    def __init__(self, reads: ReadAhead, pos: int):
        self._reads, self._pos = reads, pos
        self.models = reads.sources.models

    def __getitem__(self, m: int) -> _ModelView:
        return _ModelView(self._reads, self._pos, m)


class _ModelView:
    def __init__(self, reads: ReadAhead, pos: int, m: int):
        self._reads, self._pos, self._m = reads, pos, m

    def get(self, name: str) -> torch.Tensor:
        if (self._m, name) in self._reads._positions[self._pos]:
            return self._reads.get(self._pos, (self._m, name))
        return self._reads.sources[self._m].get(name)

    def release(self, name: str) -> None:
        """Nothing: the executor finishes the whole position (:meth:`ReadAhead.finish`)."""

    def __getattr__(self, attr: str):
        return getattr(self._reads.sources[self._m], attr)
