"""One pool of Ray actors, each running one task at a time, in the spirit of ``ray.util.ActorPool``.

Both distributed jobs run on it: the merge driver hands parts of shards to
:class:`~mergeserve.cluster.actors.MergeWorker` actors, and a sweep hands batches of variants to
its workers. The pool declares the actors (one per GPU, else one per CPU of the cluster), queues
jobs until an actor is idle, and turns a failed job into one of our errors naming the job.

Ray restarts a killed actor (``max_restarts``) and retries its task on the restarted one
(``max_task_retries``): every job here is a deterministic function of its arguments, and a part
rewrites the same bytes at the same offsets, so a retry is safe.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from mergeserve.errors import ConfigError, MergeServeError, ResourceError

RESTARTS = {"max_restarts": -1, "max_task_retries": 3}
START_UP = "worker start-up"  # what a failed start-up is reported against


def check_worker_count(workers: int | None) -> None:
    """Refuse a bad ``--workers`` before any work starts."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")


def pool_size(requested: int | None) -> tuple[int, dict[str, float], str]:
    """(number of actors, resources per actor, device) from the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return max(1, requested or gpus), {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return max(1, requested or int(res.get("CPU", 1))), {"num_cpus": 1}, "cpu"


def worker_name() -> str:
    """Names a worker in summaries: node (first 8 hex digits of the Ray node id) and pid."""
    try:
        import ray

        return f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
    except Exception:  # noqa: BLE001 - not inside Ray
        return f"local:{os.getpid()}"


def map_ray_error(e: BaseException, context: str) -> MergeServeError:
    """Ray wraps task failures: unwrap ours; otherwise say what happened to ``context`` (a short
    description of the job, e.g. ``shard model-00001-of-00004.safetensors``)."""
    import ray.exceptions as rex

    cause = getattr(e, "cause", None)
    if isinstance(cause, MergeServeError):
        return cause
    if isinstance(e, MergeServeError):
        return e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, rex.OutOfMemoryError):
        return ResourceError(f"{context}: a merge worker ran out of memory ({msg})")
    if isinstance(e, (rex.RayActorError, rex.WorkerCrashedError)):
        return ResourceError(f"{context}: the merge worker died and retries were exhausted ({msg})")
    return ResourceError(f"{context}: merge failed ({msg})")


class WorkerPool:
    """Actors of ``actor_cls`` (started with ``args``), one job at a time each.

    A job is ``(method, args)`` with a context handed back with its result and a label naming it
    in errors. :meth:`next` starts queued jobs on idle actors and returns the next result.
    """

    def __init__(self, actor_cls: type, count: int, resources: dict[str, float], *args: Any):
        import ray

        remote = ray.remote(actor_cls).options(**RESTARTS, **resources)
        self.actors = [remote.remote(*args) for _ in range(count)]
        self._idle = list(self.actors)
        self._starting: dict = {}  # ready() ref -> actor
        self._queue: deque[tuple[str, tuple, Any, str]] = deque()
        self._running: dict = {}  # task ref -> (actor, context, label)

    @classmethod
    def for_cluster(cls, actor_cls: type, workers: int | None) -> WorkerPool:
        """``workers`` actors (default: one per GPU, else per CPU), on the cluster's device."""
        n, resources, device = pool_size(workers)
        return cls(actor_cls, n, resources, device)

    def hold_until_ready(self) -> None:
        """Give an idle actor jobs only once it has started (its ``ready()`` returned), rather
        than queueing them behind its start-up."""
        for actor in self._idle:
            self._starting[actor.ready.remote()] = actor
        self._idle.clear()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def starting(self) -> int:
        return len(self._starting)

    @property
    def busy(self) -> bool:
        """Jobs queued or running, or actors starting."""
        return bool(self._queue or self._running or self._starting)

    def submit(self, method: str, args: tuple, context: Any, label: str) -> None:
        self._queue.append((method, args, context, label))
        self._start()

    def _start(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.pop()
            method, args, context, label = self._queue.popleft()
            self._running[getattr(actor, method).remote(*args)] = (actor, context, label)

    def next(self, timeout: float | None = None) -> tuple[Any, Any] | None:
        """(context, result) of the next finished job; None when ``timeout`` passed or an actor
        became ready first. Raises the job's error (see :func:`map_ray_error`)."""
        import ray

        self._start()
        refs = list(self._running) + list(self._starting)
        if not refs:
            return None
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        if ref in self._starting:
            actor = self._starting.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - mapped to our error types
                raise map_ray_error(e, START_UP) from None
            self._idle.append(actor)
            self._start()
            return None
        actor, context, label = self._running.pop(ref)
        self._idle.append(actor)
        try:
            result = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - mapped to our error types, naming the job
            raise map_ray_error(e, label) from None
        self._start()
        return context, result

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
