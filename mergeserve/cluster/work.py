"""The queue of parts that Ray actors and the driver's own helper threads take work from.

With an embedded Ray (no ``--address``), ``ray.init`` and the actors' start-up (each imports
torch) take seconds on a small machine. The driver has planned and imported the engine by then,
so helper threads in the driver merge parts from the same queue meanwhile; once every actor is
ready the helpers take no new parts and the actors do the rest. Results of both kinds reach the
dispatcher (on the main thread) as events, so shard completion and errors are handled in one place.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Sequence

from mergeserve.cluster.parts import Part, PartResult, run_part


# Below normal, not idle-only: an idle-only (19) helper starves on a machine shared with other
# work and its part in progress becomes the tail of the whole merge.
HELPER_NICE = int(os.environ.get("MERGESERVE_HELPER_NICE", "10"))  # TEMP env


class PartQueue:
    """Parts in plan order; ``take`` hands each out once."""

    def __init__(self, parts: Sequence[Part]):
        self.parts = list(parts)
        self._next = 0
        self._lock = threading.Lock()
        self._local_open = True
        self._helpers: list[threading.Thread] = []
        self.events: queue.Queue = queue.Queue()  # (Part, PartResult | BaseException) from helpers
        self.local_parts = 0

    def take(self) -> Part | None:
        with self._lock:
            if self._next >= len(self.parts):
                return None
            self._next += 1
            return self.parts[self._next - 1]

    def _take_local(self) -> Part | None:
        with self._lock:
            if not self._local_open or self._next >= len(self.parts):
                return None
            self._next += 1
            self.local_parts += 1
            return self.parts[self._next - 1]

    def start_helpers(self, plan: Any, out_dir: str, threads: int | None = None) -> None:
        """Merge parts on ``threads`` driver threads (default: one per CPU) until :meth:`stop_helpers`."""
        from mergeserve.merge.execute import SourceCache

        sources = SourceCache(plan.models)
        left = [threads or os.cpu_count() or 1]

        def helper() -> None:
            # Lower CPU priority (per thread on Linux, inherited by the writer thread it starts):
            # the helpers are to use what Ray's start-up leaves idle, not to slow it down.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HELPER_NICE)
            except (AttributeError, OSError):
                pass
            try:
                while (part := self._take_local()) is not None:
                    try:
                        res: PartResult | BaseException = run_part(plan, part, out_dir, sources=sources, worker="driver")
                    except BaseException as e:  # noqa: BLE001 - handed to the dispatcher
                        res = e
                    self.events.put((part, res))
                    if isinstance(res, BaseException):
                        return
            finally:
                with self._lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    sources.close()

        for i in range(left[0]):
            t = threading.Thread(target=helper, name=f"mergeserve-helper-{i}", daemon=True)
            self._helpers.append(t)
            t.start()

    @property
    def helpers_busy(self) -> bool:
        return any(t.is_alive() for t in self._helpers)

    def stop_helpers(self, wait: bool = False) -> None:
        """No new parts for the helpers; with ``wait``, also wait for their parts in progress."""
        with self._lock:
            self._local_open = False
        if wait:
            for t in self._helpers:
                t.join()
