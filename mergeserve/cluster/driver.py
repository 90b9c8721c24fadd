"""The distributed merge driver: plan, dispatch shards to Ray actors, assemble, commit.

Flow (``mergeserve merge CONFIG OUT [--address ...] [--workers N] [--resume]``):

1. Validate the recipe and every input header, build the plan (no Ray needed). Ray start-up runs
   in a background thread meanwhile, so its ~2 s overlap with planning.
2. Connect: a local Ray sized to this machine when no ``--address``; ``auto`` or ``ray://host:port``
   (or ``host:port``) joins an existing cluster. An unreachable address fails within seconds.
3. A pool of :class:`~mergeserve.cluster.actors.MergeWorker` actors runs the shard tasks. Inputs
   must be on a filesystem every node sees (the same paths), and so must OUT's parent directory.
4. The driver writes index, config, tokenizer, card and manifest, then renames the staging
   directory into place. ``--resume`` reuses the staging directory of an interrupted run: it
   refuses if the recipe or any input changed, verifies finished shards by sha256, redoes the rest.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeserve.errors import ClusterError, ConfigError, InputError, MergeServeError, ResourceError

if TYPE_CHECKING:
    from mergeserve.merge.api import MergeResult

# torch and the merge engine are imported on the planning thread, while Ray starts on this one:
# both take seconds, and a short merge is dominated by such fixed costs.

AUTO_SHARDS_PER_WORKER = 3


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast on an address nobody listens on (ray.init would retry for a long time)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"--address {address}: Ray cluster unreachable ({e.strerror or e})") from None


def connect(address: str | None) -> bool:
    """Initialise Ray; returns True if this call started a local cluster (to shut it down after)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address is None:
        ray.init(  # "local": a new embedded cluster even if RAY_ADDRESS or a running one is found
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
            _node_ip_address="127.0.0.1", configure_logging=False,
        )
        return True
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    return False


def cluster_workers(requested: int | None) -> tuple[int, dict[str, float], str]:
    """(number of actors, resources per actor, device) from the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return max(1, requested or gpus), {"num_gpus": 1, "num_cpus": 1}, "cuda"
    return max(1, requested or int(res.get("CPU", 1))), {"num_cpus": 1}, "cpu"


def _auto_shard_size(config: Any, workers_hint: int, **kw: Any) -> int:
    """Enough shards for every worker to stay busy, each holding whole layers, at most 5 GB."""
    from mergeserve.merge.api import plan_merge

    _, _, probe = plan_merge(config, out_shard_size=10**15, **kw)
    return max(1, min(5_000_000_000, probe.bytes_written // max(1, workers_hint * AUTO_SHARDS_PER_WORKER)))


def merge_distributed(
    config: Any,
    out_dir: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    device: str = "cpu",
    out_shard_size: str | int | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
    **plan_kw: Any,
) -> "MergeResult":
    """Merge on Ray. ``plan_kw``: out_dtype, models_dir, allow_pickle, seed (see merge.api.merge)."""
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    # Plan on a helper thread while Ray starts on this one. (Not the other way round: Ray ties
    # its GCS and raylet to the starting thread with PR_SET_PDEATHSIG, so a Ray started on a
    # short-lived thread dies with that thread.)
    box: dict[str, Any] = {}

    def _plan():
        try:
            from mergeserve.merge.api import _check_device, plan_merge
            from mergeserve.merge.writer import StagingDir

            size = out_shard_size
            if size in (None, "auto"):
                size = _auto_shard_size(config, workers or os.cpu_count() or 1, **plan_kw)
            box["plan"] = plan_merge(config, out_shard_size=size, **plan_kw)
            if device != "cpu":
                _check_device(device)
            box["stage"] = StagingDir(out_dir, overwrite=overwrite or resume, resume=resume)
        except BaseException as e:  # noqa: BLE001 - re-raised on this thread
            box["err"] = e

    planner = threading.Thread(target=_plan, name="mergeserve-plan", daemon=True)
    planner.start()
    own, actors = False, []
    try:
        own = connect(address)
        # Start the actors now: their imports overlap the rest of the planning.
        n, resources, dev = cluster_workers(workers)
        from mergeserve.cluster.actors import MergeWorker

        actors = [MergeWorker.options(max_restarts=-1, max_task_retries=3, **resources).remote(dev) for _ in range(n)]
        planner.join()
        if "err" in box:
            raise box["err"]
        cfg, text, plan = box["plan"]
        return _run(cfg, text, plan, box["stage"], actors, resume, progress, t0)
    finally:
        planner.join()
        import ray

        for a in actors:
            ray.kill(a)
        if own:
            ray.shutdown()


def _run(cfg, text, plan, stage, actors, resume, progress, t0):
    from mergeserve.cluster.resume import load_done_shards, write_run_state
    from mergeserve.merge.api import MergeResult, _progress
    from mergeserve.merge.execute import peak_rss_bytes
    from mergeserve.merge.outputs import write_metadata
    from mergeserve.merge.reader import fingerprint

    inputs = {m.ref: fingerprint(m.path) for m in plan.models}
    done = load_done_shards(stage.path, plan, inputs) if resume else {}
    if not resume:
        write_run_state(stage.path, plan, inputs)
    todo = [s for s in plan.shards if s.index not in done]
    results = list(done.values())
    keep_partial = True
    try:
        with _progress(plan, progress) as bar:
            bar.update(sum(r.bytes_written for r in results))
            if todo:
                results += _dispatch(plan, todo, actors, str(stage.path), bar)
        write_metadata(stage.path, cfg, text, plan, results, seconds=time.perf_counter() - t0)
        for s in plan.shards:  # resume records are not part of the checkpoint
            (stage.path / f".{s.filename}.done.json").unlink(missing_ok=True)
        (stage.path / ".mergeserve-run.json").unlink(missing_ok=True)
        out = stage.commit()
    except (InputError, ConfigError, ResourceError):
        keep_partial = False
        raise
    except BaseException:
        if any(True for _ in stage.path.glob("*.safetensors")):
            import sys

            print(f"mergeserve: partial results kept in {stage.path}; rerun with --resume to finish", file=sys.stderr)
        raise
    finally:
        if not keep_partial:
            stage.discard()
    workers_rss: dict[str, int] = {}
    for r in results:
        workers_rss[r.worker] = max(workers_rss.get(r.worker, 0), r.peak_rss)
    return MergeResult(
        out, plan, sorted(results, key=lambda r: r.index), time.perf_counter() - t0, peak_rss_bytes(), workers_rss, len(done)
    )


def _dispatch(plan, todo, actors, out_dir: str, bar) -> list:
    """Run shard tasks on the actors, each actor one shard at a time; returns ShardResults.

    Each task's shard is tracked so that any failure names it. Ray retries a task whose actor
    died (``max_task_retries``) on the restarted actor; what still fails is raised here.
    """
    import ray

    plan_ref = ray.put(plan)
    queue, idle, running, results = list(reversed(todo)), list(actors), {}, []
    while queue or running:
        while idle and queue:
            actor, shard = idle.pop(), queue.pop()
            running[actor.run.remote(plan_ref, shard.index, out_dir)] = (actor, shard)
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, shard = running.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - mapped to our error types
            raise _map_ray_error(e, shard.filename) from None
        results.append(res)
        bar.update(res.bytes_written)
        idle.append(actor)
    return results


def _map_ray_error(e: Exception, shard: str) -> MergeServeError:
    """Ray wraps task failures: unwrap ours; name the shard for out-of-memory and lost workers."""
    import ray.exceptions as rex

    cause = getattr(e, "cause", None)
    if isinstance(cause, MergeServeError):
        return cause
    if isinstance(e, MergeServeError):
        return e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, rex.OutOfMemoryError):
        return ResourceError(f"shard {shard}: a merge worker ran out of memory ({msg})")
    if isinstance(e, (rex.RayActorError, rex.WorkerCrashedError)):
        return ResourceError(f"shard {shard}: the merge worker died and retries were exhausted ({msg})")
    return ResourceError(f"shard {shard}: merge failed ({msg})")
