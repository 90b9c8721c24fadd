"""The queue of parts that Ray actors and the driver's own helper threads take work from.

With an embedded Ray (no ``--address``), ``ray.init`` and the actors' start-up (each imports
torch) take seconds on a small machine. The driver has planned and imported the engine by then,
so helper threads in the driver merge parts from the same queue meanwhile; once every actor is
ready the helpers stop at the next tensor and the actors do the rest. The helpers run at normal
priority: a lower-priority helper starves on a machine shared with other work, and its tensor in
progress becomes the tail of the whole merge. Results of both kinds reach the dispatcher (on the
main thread) as events, so shard completion and errors are handled in one place.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from mergeserve.cluster.parts import Part, PartResult, run_part


class PartQueue:
    """Parts in plan order; ``take`` hands each out once."""

    def __init__(self, parts: Sequence[Part]):
        self.parts = list(parts)
        self._queue = deque(self.parts)
        self._lock = threading.Lock()
        self._local_open = True
        self._helpers: list[threading.Thread] = []
        self.events: queue.Queue = queue.Queue()  # (Part, PartResult | BaseException) from helpers

    def finished(self) -> Iterator[tuple[Part, PartResult | BaseException]]:
        """The helpers' results (or errors) that arrived since the last call."""
        while True:
            try:
                yield self.events.get_nowait()
            except queue.Empty:
                return

    def take(self) -> Part | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def _take_local(self) -> Part | None:
        with self._lock:
            if not self._local_open or not self._queue:
                return None
            return self._queue.popleft()

    def _stopped(self) -> bool:
        return not self._local_open

    def _give_back(self, part: Part) -> None:
        with self._lock:
            self._queue.appendleft(part)

    def start_helpers(self, batch: Any, out_dirs: Sequence[str], threads: int | None = None) -> None:
        """Merge parts of ``batch`` (a merge.multi.Batch) on ``threads`` driver threads (default:
        one per CPU) until :meth:`stop_helpers`."""
        from mergeserve.merge.execute import SourceCache

        sources = SourceCache(batch)
        left = [threads or os.cpu_count() or 1]

        def helper() -> None:
            try:
                while (part := self._take_local()) is not None:
                    try:
                        res: PartResult | BaseException = run_part(
                            batch, part, out_dirs, sources=sources, worker="driver", should_stop=self._stopped
                        )
                    except BaseException as e:  # noqa: BLE001 - handed to the dispatcher
                        res = e
                    if isinstance(res, PartResult) and res.part.stop < part.stop:
                        # Stopped between tensors: the actors are up and take the rest (one helper
                        # thread finishing the part beside busy actors would be the merge's tail).
                        self._give_back(Part(part.shard, res.part.stop, part.stop, part.bytes_written - res.part.bytes_written))
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
