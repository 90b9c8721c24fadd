"""CPU-seconds by phase of a merge, summed over the threads that do each: :class:`PhaseClock`.

A merge reads its inputs, merges, quantizes (FP8 out), hashes what it read and writes, and writes.
Each runs on its own threads (reader, merge, writer), so wall time alone does not say which one a
merge waits for; the CPU each phase spent does. Times are ``time.thread_time()`` deltas: user and
kernel CPU of the thread doing the work (a read's kernel copy counts to "read", the O_DIRECT
write's bounce copy and syscalls to "write"). They travel in shard and part results (so Ray
actors' phases count too), the run summary and the manifest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping

PHASES = ("read", "merge", "quantize", "hash", "write")


class PhaseClock:
    """CPU-seconds per phase (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds

    def add_all(self, other: Mapping[str, float]) -> None:
        with self._lock:
            for k, v in other.items():
                self.seconds[k] = self.seconds.get(k, 0.0) + v

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


def thread_cpu() -> float:
    return time.thread_time()


def summed(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The phase-by-phase sum of several results' CPU times."""
    clock = PhaseClock()
    for p in parts:
        clock.add_all(p)
    return clock.as_dict()


def describe(cpu: Mapping[str, float]) -> str:
    """'read 1.2, merge 30.4, quantize 0.0, hash 2.1, write 1.8 (total 35.5)'"""
    total = sum(cpu.values())
    return ", ".join(f"{k} {cpu.get(k, 0.0):.1f}" for k in PHASES) + f" (total {total:.1f})"
