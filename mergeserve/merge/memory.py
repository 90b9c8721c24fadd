"""The process's memory: glibc's allocator tuned for a merge (:func:`tune_malloc`), peak RSS.

No torch here: the command line calls :func:`tune_malloc` first thing, before any thread exists.
"""

from __future__ import annotations

import ctypes
import resource
import sys

_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep large temporaries on glibc's heap instead of fresh mmaps (once per process).

    By default glibc serves every allocation over ~128 KB-32 MB with its own mmap and returns it
    with munmap, so each float32 chunk of a merge costs page faults and zeroing in the kernel
    (0.9 CPU-s per GB on this project's VM, a sixth of a slerp merge's CPU). Raising the mmap and
    trim thresholds lets freed chunks be reused. Peak memory is unchanged: it is still bounded by
    the largest tensor's temporaries, which are now kept for reuse rather than returned.

    That holds for glibc's main arena only. A thread's own arena grows in heaps of at most 64 MB,
    so a larger block (a merged 7B MLP weight is 117 MB) is mmap-ed and unmapped again, however
    high the threshold: every output tensor of the merge threads came from fresh pages. With one
    arena (M_ARENA_MAX 1) every thread allocates from the main one; the merge threads allocate a
    few large blocks per tensor, so they hardly contend for its lock. The limit applies to threads
    that get their first arena afterwards, hence the call at the command line's start (and at a
    Ray actor's, whose merge runs on its main thread anyway).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)
    libc.mallopt(M_ARENA_MAX, 1)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
