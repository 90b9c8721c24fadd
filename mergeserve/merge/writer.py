"""Streaming safetensors output and atomic checkpoint directories.

:class:`ShardWriter` writes one safetensors file tensor by tensor: the plan knows every output
name, dtype and shape in advance, so the header is written first and each tensor's bytes are
appended as soon as it is merged. Memory stays at one tensor, not one shard. Each tensor's
digest (:mod:`.digest`) is computed on the way out (for the manifest and ``--resume``).

:class:`StagingDir` makes the checkpoint appear atomically: everything is written under a hidden
sibling ``.NAME.partial`` and renamed into place only when complete. A failed merge leaves
nothing at the destination (the partial directory is removed, or kept for ``--resume``), and one
output has one writer at a time (``.NAME.lock``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeserve.errors import InputError, OutputExistsError, ResourceError
from mergeserve.merge.digest import digest_of
from mergeserve.merge.phases import thread_cpu
from mergeserve.merge.reader import TORCH_TO_ST, tensor_nbytes


def tmp_path(path: str | Path) -> Path:
    """Where a file is written before its atomic rename to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (contiguous), without a copy when possible."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class _QueuedWriter:
    """What both writers share: tensors are checked against the plan on the caller's thread, then
    hashed and stored on a writer thread, so that both (they release the GIL) overlap the merge of
    the next tensor. The bounded queue caps memory at a few tensors in flight. A failed store is
    re-raised on the caller's next call. :attr:`cpu` is the writer thread's CPU-seconds ("hash",
    "write"), complete once closed."""

    def __init__(self, path: Path, slots: Sequence[TensorSlot]):
        self.path = path
        self._slots = list(slots)
        self._next = 0
        self.hashes: dict[str, str] = {}
        self.cpu = {"hash": 0.0, "write": 0.0}
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._drain, name=f"write-{path.name}", daemon=True)

    def _store(self, slot: TensorSlot, data: memoryview, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep consuming so that producers never block on a dead writer
            slot, data, tensor = item
            try:
                t0 = thread_cpu()
                self.hashes[slot.name] = digest_of(data)
                t1 = thread_cpu()
                self._store(slot, data, tensor)
                self.cpu["hash"] += t1 - t0
                self.cpu["write"] += thread_cpu() - t1
            except OSError as e:
                self._error = write_error(self.path, e)
            except BaseException as e:  # noqa: BLE001 - re-raised on the producer's thread
                self._error = e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the next tensor (in the planned order) for hashing and writing."""
        if self._error is not None:
            raise self._error
        slot = self._slots[self._next]
        if name != slot.name:
            raise ValueError(f"writer for {self.path.name}: expected tensor {slot.name!r}, got {name!r}")
        if TORCH_TO_ST.get(tensor.dtype) != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: planned {slot.dtype}{list(slot.shape)}, got {TORCH_TO_ST.get(tensor.dtype)}{list(tensor.shape)}")
        tensor = tensor.detach().contiguous().cpu()
        self._queue.put((slot, tensor_bytes(tensor), tensor))  # the tensor keeps the bytes alive
        self._next += 1

    def _finish(self, partial: bool = False) -> None:
        """Wait for the queued tensors; raise what the writer thread met."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != len(self._slots) and not partial:
            raise ValueError(f"{self.path.name}: closed after {self._next} of {len(self._slots)} tensors")


class ShardWriter(_QueuedWriter):
    """Write one ``.safetensors`` file whose layout is known before any tensor is computed.

    ``entries``: (name, safetensors dtype code, shape) in the order tensors will be written.
    """

    def __init__(self, path: str | Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        layout = ShardLayout(entries, metadata)
        super().__init__(Path(path), layout.tensors)
        self.total_bytes = layout.total_bytes
        self._f = open(self.path, "wb")
        try:
            self._f.write(layout.header)
        except OSError as e:
            self._f.close()
            raise write_error(self.path, e) from None
        self._thread.start()

    def _store(self, slot: TensorSlot, data: memoryview, tensor: torch.Tensor) -> None:
        self._f.write(data)  # tensors arrive in file order

    def close(self, partial: bool = False) -> dict[str, str]:
        """Wait for the queued tensors, close the file; returns {name: digest}."""
        try:
            self._finish(partial)
            # No fsync: durability is the page cache's job; atomicity comes from the rename of
            # the finished file (and of the whole directory), which is what readers depend on.
            self._f.flush()
        except OSError as e:
            raise ResourceError(f"{self.path}: flush failed: {e.strerror or e}") from None
        finally:
            self._f.close()
        return self.hashes

    def abort(self) -> None:
        try:
            self._finish(partial=True)
        except BaseException:  # noqa: BLE001 - aborting anyway; the caller has the first error
            pass
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)


def write_error(path: Path, e: OSError) -> ResourceError:
    """A failed write of the checkpoint, as the error the user sees."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"{path}: disk full while writing the checkpoint")
    if e.errno == errno.EFBIG:
        return ResourceError(f"{path}: file size limit reached while writing the checkpoint")
    return ResourceError(f"{path}: write failed: {e.strerror or e}")


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go in a shard file (``offset`` is absolute)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class ShardLayout:
    """The byte layout of one safetensors file, known before any tensor is computed.

    ``entries``: (name, safetensors dtype code, shape) in file order. ``header`` is the 8-byte
    length plus the JSON header (padded so that the data section is 8-byte aligned, as the
    reference writer does); tensor ``i`` occupies ``tensors[i].offset`` .. ``+ nbytes``.
    """

    def __init__(self, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        spans = []
        for name, dtype, shape in entries:
            n = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            spans.append((name, dtype, tuple(shape), offset, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = len(raw).to_bytes(8, "little") + raw
        base = len(self.header)
        self.tensors = [TensorSlot(name, dtype, shape, base + off, n) for name, dtype, shape, off, n in spans]
        self.total_bytes = base + offset


def create_sized(path: Path, layout: ShardLayout, *, sized: bool = True) -> None:
    """Create ``path`` holding ``layout``'s header, at its full size (the data still sparse), so
    that several processes can each fill in their own tensors with :class:`SlotWriter` (without
    ``sized``: the header only, for one writer whose tensors extend the file in order)."""
    try:
        with open(path, "wb") as f:
            f.write(layout.header)
            if sized:
                f.truncate(layout.total_bytes)
    except OSError as e:
        raise write_error(path, e) from None


DIRECT_BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers (covers 512-byte devices)
DIRECT_CHUNK = 8 << 20


def _pwrite_all(fd: int, data, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class SlotWriter(_QueuedWriter):
    """Fill in some tensors of a file made by :func:`create_sized`, at their planned offsets.

    Like :class:`ShardWriter`, each tensor is hashed and written on a thread beside the
    caller's merge of the next one. Writers in other processes (or on other nodes sharing the
    filesystem) may fill in other tensors of the same file at the same time: ranges never overlap.

    The 4 KiB-aligned interior of each tensor is written with ``O_DIRECT`` (through an aligned
    bounce buffer), the unaligned ends (and everything, where the filesystem refuses
    ``O_DIRECT``, e.g. tmpfs) through the page cache: a buffered write costs the kernel several times
    the CPU of a direct one (it fills fresh page-cache pages), a large share of a merge on a small
    machine. Pages shared by two tensors are only ever written buffered, so writers never mix the two paths on
    one page.
    """

    def __init__(self, path: str | Path, slots: Sequence[TensorSlot], *, direct: bool = True):
        super().__init__(Path(path), slots)
        self._owns_file = False
        try:
            self._fd = os.open(self.path, os.O_WRONLY)
        except OSError as e:
            raise write_error(self.path, e) from None
        self._dfd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
                self._bounce = mmap.mmap(-1, DIRECT_CHUNK)  # anonymous maps are page-aligned
                self._bounce_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._bounce))
            except OSError:
                self._dfd = None
        self._thread.start()

    @classmethod
    def whole_file(cls, path: str | Path, layout: ShardLayout, *, direct: bool = True) -> SlotWriter:
        """A writer of every tensor of a new file of ``layout``, in order (the file grows with them:
        a full disk shows where it happens); :meth:`abort` removes the file."""
        path = Path(path)
        create_sized(path, layout, sized=False)
        try:
            writer = cls(path, layout.tensors, direct=direct)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        writer._owns_file = True
        return writer

    def _write_direct(self, data: memoryview, src_addr: int, offset: int) -> None:
        """Write ``data`` (at address ``src_addr``) at ``offset``: aligned interior direct, ends buffered."""
        end = offset + len(data)
        a = -(-offset // DIRECT_BLOCK) * DIRECT_BLOCK
        b = end // DIRECT_BLOCK * DIRECT_BLOCK
        if self._dfd is None or b - a < DIRECT_BLOCK:
            _pwrite_all(self._fd, data, offset)
            return
        _pwrite_all(self._fd, data[: a - offset], offset)
        _pwrite_all(self._fd, data[b - offset :], b)
        view = memoryview(self._bounce)
        for start in range(a, b, DIRECT_CHUNK):
            n = min(DIRECT_CHUNK, b - start)
            ctypes.memmove(self._bounce_addr, src_addr + (start - offset), n)  # releases the GIL
            try:
                _pwrite_all(self._dfd, view[:n], start)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # The device wants another alignment: the rest goes through the page cache.
                os.close(self._dfd)
                self._dfd = None
                _pwrite_all(self._fd, data[start - offset : b - offset], start)
                return

    def _store(self, slot: TensorSlot, data: memoryview, tensor: torch.Tensor) -> None:
        self._write_direct(data, tensor.data_ptr(), slot.offset)

    def _close_fds(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._dfd = None

    def close(self, partial: bool = False) -> dict[str, str]:
        """Wait for the queued tensors, close the file; returns {name: digest}. With ``partial``,
        the writer may have been given only the first of its slots' tensors."""
        try:
            self._finish(partial)
        finally:
            self._close_fds()
        return self.hashes

    def abort(self) -> None:
        try:
            self._finish(partial=True)
        except BaseException:  # noqa: BLE001 - aborting anyway; the caller has the first error
            pass
        self._close_fds()
        if self._owns_file:
            self.path.unlink(missing_ok=True)


class StagingDir:
    """A hidden sibling directory that becomes ``dest`` atomically via :meth:`commit`.

    - ``protect``: inputs (model directories, ``--models-dir``, the recipe). An output that is,
      contains or sits inside one is refused, ``--overwrite`` or not: replacing the output
      deletes what was there.
    - One writer per output: ``.NAME.lock`` beside the staging directory is held (``flock``)
      from here to :meth:`commit`, :meth:`discard` or :meth:`release`; a second merge to the
      same output is refused at once. The lock file is removed by its holder.
    - ``--overwrite`` replaces a directory only: a file or symlink at ``dest`` is not a previous
      output, and replacing it would delete something the user did not mean (refused).
    - :meth:`discard` removes the staging directory and the parent directories this created.
    """

    def __init__(self, dest: str | Path, *, overwrite: bool = False, resume: bool = False, protect: Iterable[str | Path] = ()):
        self.dest = Path(dest).absolute()
        self.path = self.dest.parent / f".{self.dest.name}.partial"
        self._old = self.dest.parent / f".{self.dest.name}.old"
        self._lock_path = self.dest.parent / f".{self.dest.name}.lock"
        self.overwrite = overwrite
        self.resuming = False
        self._lock_fd: int | None = None
        _refuse_overlap(self.dest, [self.path, self._old], protect)
        self._created = _missing_parents(self.dest.parent)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self._lock_path, self.dest)
            self._check_dest()  # after locking: a merge that finished meanwhile has committed
            if self.path.exists() and not resume:
                _remove(self.path)
            self.resuming = self.path.exists()  # an interrupted run's: kept when this one fails early
            self.path.mkdir(exist_ok=True)
        except BaseException as e:
            self.release()
            self._remove_parents()
            if isinstance(e, OSError):
                raise InputError(f"output directory {self.dest}: cannot create: {e.strerror or e}") from None
            raise

    def _check_dest(self) -> None:
        if not os.path.lexists(self.dest):
            return
        if not self.overwrite:
            raise OutputExistsError(f"output directory {self.dest} already exists (pass --overwrite to replace it)")
        if self.dest.is_symlink() or not self.dest.is_dir():
            what = "a symbolic link" if self.dest.is_symlink() else "not a directory"
            raise OutputExistsError(f"output {self.dest} exists and is {what}; --overwrite replaces only a directory")

    def commit(self) -> Path:
        """Move the finished checkpoint into place (replacing an old one when overwriting)."""
        try:
            self._check_dest()
            moved = False
            if os.path.lexists(self.dest):
                if os.path.lexists(self._old):
                    _remove(self._old)
                os.rename(self.dest, self._old)
                moved = True
            try:
                os.rename(self.path, self.dest)
            except OSError:
                if moved:
                    os.rename(self._old, self.dest)
                raise
            if moved:
                _remove(self._old)
        except OSError as e:
            raise ResourceError(f"output directory {self.dest}: cannot move the finished checkpoint into place: {e.strerror or e}") from None
        finally:
            self.release()
        return self.dest

    def discard(self) -> None:
        """Remove everything this created: the staging directory, the lock, new parent directories."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()
        self._remove_parents()

    def release(self) -> None:
        """Give up the lock, keeping the staging directory (for ``--resume``)."""
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)  # while still held: a waiter then retries on a new file
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_parents(self) -> None:
        for d in self._created:  # deepest first; only the empty ones
            try:
                os.rmdir(d)
            except OSError:
                break


def _missing_parents(d: Path) -> list[Path]:
    """``d`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not os.path.lexists(d) and d != d.parent:
        out.append(d)
        d = d.parent
    return out


def _refuse_overlap(dest: Path, siblings: list[Path], protect: Iterable[str | Path]) -> None:
    outs = [Path(os.path.realpath(p)) for p in (dest, *siblings)]
    for p in protect:
        inp = Path(os.path.realpath(p))
        for out in outs:
            if out == inp or inp in out.parents or out in inp.parents:
                raise InputError(
                    f"output {dest} overlaps the input {p}: the output must not be, contain or sit inside "
                    "an input model directory, --models-dir or the recipe"
                )


def _lock(path: Path, dest: Path) -> int:
    """Hold ``flock`` on ``path`` (created if absent); OutputExistsError if another process does."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(
                f"output {dest}: another merge is writing it (it holds {path}); wait for it to finish or choose another output"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the new one
    raise OutputExistsError(f"output {dest}: cannot take the lock {path}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
