"""The distributed merge driver: plan, dispatch shards to Ray actors, assemble, commit.

Flow (``mergeserve merge CONFIG OUT [--address ...] [--workers N] [--resume]``):

1. Validate the recipe and every input header, build the plan (no Ray needed). Ray start-up runs
   in a background thread meanwhile, so its ~2 s overlap with planning.
2. Connect: a local Ray sized to this machine when no ``--address``; ``auto`` or ``ray://host:port``
   (or ``host:port``) joins an existing cluster. An unreachable address fails within seconds.
3. Each shard is cut into parts (runs of whole tensors, see :mod:`~mergeserve.cluster.parts`),
   so that every worker has work even when ``--out-shard-size`` makes one file. A pool of
   :class:`~mergeserve.cluster.actors.MergeWorker` actors runs the parts; with an embedded Ray the
   driver's own threads merge parts from the same queue until the actors are ready (see
   :mod:`~mergeserve.cluster.work`). Inputs must be on a filesystem every node sees (the same
   paths), and so must OUT's parent directory.
4. The driver writes index, config, tokenizer, card and manifest, then renames the staging
   directory into place. ``--resume`` reuses the staging directory of an interrupted run: it
   refuses if the recipe or any input changed, verifies finished shards by sha256, redoes the rest.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeserve.cluster import guardian
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


@contextmanager
def _lean_head_node():
    """While ``ray.init`` starts an embedded cluster: no autoscaler monitor, no log monitor, no
    API server.

    None has work here: nothing to autoscale; ``log_to_driver=False``; and with
    ``include_dashboard=False`` the API server process runs only Ray's usage-stats module. On a
    small machine their start-up competes with the merge (together about 2 CPU-seconds measured
    here), and the monitor alone held ``ray.shutdown`` for 1 s (it outlasts the SIGTERM grace
    period). ``ray.init`` has no options for them; the node parameters it builds (``RayParams``)
    do for the monitors, and the API server is started by one method of the head node. If Ray's
    internals differ from what is expected here, nothing is changed and Ray starts them as usual.
    """
    try:
        from ray._private import node, parameter

        orig_params = parameter.RayParams.__init__
        orig_api = node.Node.start_api_server
        if not {"no_monitor", "include_log_monitor"} <= set(inspect.signature(orig_params).parameters):
            raise LookupError
    except Exception:  # noqa: BLE001 - see above
        yield
        return

    def lean_params(self, *args, **kwargs):
        kwargs["no_monitor"] = True
        kwargs["include_log_monitor"] = False
        orig_params(self, *args, **kwargs)

    def no_api_server(self, *args, **kwargs):
        if kwargs.get("include_dashboard"):
            return orig_api(self, *args, **kwargs)
        return None

    parameter.RayParams.__init__ = lean_params
    node.Node.start_api_server = no_api_server
    try:
        yield
    finally:
        parameter.RayParams.__init__ = orig_params
        node.Node.start_api_server = orig_api


@contextmanager
def _quiet_token_banner():
    """No "Token authentication is enabled for this Ray cluster..." on the user's stderr.

    ``ray.init`` logs it (a warning, printed by Python's last-resort handler since Ray's logging
    is not configured) whenever it starts a cluster with token auth on by default. For an
    embedded cluster that is an internal detail of one command; auth stays on as Ray sets it.
    """
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def connect(address: str | None) -> bool:
    """Initialise Ray; returns True if this call started a local cluster (to shut it down after)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address is None:
        guardian.start()  # its processes end with this one, even if it is SIGKILLed
        with _lean_head_node(), _quiet_token_banner():
            ray.init(  # "local": a new embedded cluster even if RAY_ADDRESS or a running one is found
                address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                _node_ip_address="127.0.0.1", configure_logging=False,
                # Ray runs workers at nice 15 by default; here they are the merge itself, and at
                # 15 they lost the CPU to everything else, the driver's helper threads included
                # (measured: an actor took 18 s to start beside them).
                _system_config={"worker_niceness": 0},
            )
        guardian.track(_node_pids())
        return True
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    return False


def _node_pids() -> list[int]:
    """PIDs of the processes ``ray.init`` started for the embedded cluster (GCS, raylet)."""
    try:
        from ray._private import worker as ray_worker

        return [info.process.pid for infos in ray_worker._global_node.all_processes.values() for info in infos]
    except Exception:  # noqa: BLE001 - Ray's internals moved: the guardian then has nothing to watch
        return []


def shutdown_embedded() -> None:
    """Stop the embedded cluster this process started, and wait for its processes to exit.

    ``ray.shutdown`` stops the processes one by one, each with SIGTERM and up to 1 s of grace
    before SIGKILL. The autoscaler monitor does not exit on SIGTERM within that second (measured
    here: ``ray.shutdown`` 1.4 s, 1.0 s of it waiting on the monitor). :func:`_lean_head_node`
    normally keeps it from starting; should it run anyway, it gets SIGKILL first (an embedded
    cluster has nothing for it to scale). ``ray.shutdown`` then stops the rest (raylet and its
    workers, GCS, dashboard) as usual.
    """
    import ray

    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_constants import PROCESS_TYPE_MONITOR

        node = ray_worker._global_node
        for info in node.all_processes.get(PROCESS_TYPE_MONITOR, []) if node is not None else []:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(5)
    except Exception:  # noqa: BLE001 - Ray's internals moved: ray.shutdown still stops it, only slower
        pass
    ray.shutdown()
    guardian.stop()


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
    # short-lived thread dies with that thread.) With an embedded Ray, the planning thread then
    # starts merging parts itself until the actors are up (see cluster.work).
    box: dict[str, Any] = {}
    embedded = threading.Event()
    decided = threading.Event()

    def _prepare():
        try:
            box["prep"] = _prepare_run(config, out_dir, workers, resume, device, out_shard_size, overwrite, plan_kw)
            decided.wait()
            if embedded.is_set() and device == "cpu":
                prep = box["prep"]
                prep["work"].start_helpers(prep["plan"], str(prep["stage"].path))
        except BaseException as e:  # noqa: BLE001 - re-raised on this thread
            box["err"] = e

    planner = threading.Thread(target=_prepare, name="mergeserve-plan", daemon=True)
    planner.start()
    own, actors, work, handed = False, [], None, False
    try:
        import ray

        if address is None and not ray.is_initialized():
            embedded.set()
        decided.set()
        own = connect(address)
        # Start the actors now: their imports overlap the rest of the planning.
        n, resources, dev = cluster_workers(workers)
        from mergeserve.cluster.actors import MergeWorker

        actors = [MergeWorker.options(max_restarts=-1, max_task_retries=3, **resources).remote(dev) for _ in range(n)]
        planner.join()
        if "err" in box:
            raise box["err"]
        work = box["prep"]["work"]
        handed = True  # from here _run commits, keeps or discards the staging directory
        return _run(box["prep"], actors, progress, t0)
    finally:
        decided.set()
        planner.join()
        work = work or box.get("prep", {}).get("work")
        if work is not None:
            work.stop_helpers(wait=True)
        if not handed and "prep" in box:  # failed while connecting (e.g. an unreachable --address)
            _abandon(box["prep"]["stage"])
        import ray

        for a in actors:
            ray.kill(a)
        if own:
            shutdown_embedded()


def _prepare_run(config, out_dir, workers, resume, device, out_shard_size, overwrite, plan_kw) -> dict:
    """Everything before the first tensor: plan, staging directory, resume check, parts, shard files."""
    from mergeserve.cluster.parts import prepare_shard, split_parts
    from mergeserve.cluster.resume import load_done_shards, write_run_state
    from mergeserve.cluster.work import PartQueue
    from mergeserve.merge.api import _check_device, plan_merge, protected_inputs
    from mergeserve.merge.reader import fingerprint
    from mergeserve.merge.writer import StagingDir

    size = out_shard_size
    if size in (None, "auto"):
        size = _auto_shard_size(config, workers or os.cpu_count() or 1, **plan_kw)
    cfg, text, plan = plan_merge(config, out_shard_size=size, **plan_kw)
    if device != "cpu":
        _check_device(device)
    stage = StagingDir(out_dir, overwrite=overwrite or resume, resume=resume, protect=protected_inputs(plan, plan_kw.get("models_dir")))
    try:
        inputs = {m.ref: fingerprint(m.path) for m in plan.models}
        done = load_done_shards(stage.path, plan, inputs) if resume else {}
        if not resume:
            write_run_state(stage.path, plan, inputs)
        todo = [s for s in plan.shards if s.index not in done]
        for s in todo:
            prepare_shard(stage.path, s)
        parts = split_parts(todo, max(workers or 0, os.cpu_count() or 1))
    except BaseException:
        _abandon(stage)
        raise
    return {"cfg": cfg, "text": text, "plan": plan, "stage": stage, "done": done, "work": PartQueue(parts), "resume": resume}


def _abandon(stage) -> None:
    """A run that failed before its first tensor: nothing of it stays (an interrupted run being
    resumed stays as it was, for the next --resume)."""
    if stage.resuming:
        stage.release()
    else:
        stage.discard()


def _run(prep, actors, progress, t0):
    from mergeserve.merge.api import MergeResult, _progress
    from mergeserve.merge.execute import peak_rss_bytes
    from mergeserve.merge.outputs import write_metadata

    plan, stage, done, work = prep["plan"], prep["stage"], prep["done"], prep["work"]
    results = list(done.values())
    parts = []
    keep_partial = True
    try:
        with _progress(plan, progress) as bar:
            bar.update(sum(r.bytes_written for r in results))
            if work.parts:
                shard_results, parts = _dispatch(plan, work, actors, str(stage.path), bar)
                results += shard_results
        write_metadata(stage.path, prep["cfg"], prep["text"], plan, results, seconds=time.perf_counter() - t0)
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
        work.stop_helpers(wait=True)  # nothing may write into the staging directory after this
        if not keep_partial:
            stage.discard()
        stage.release()
    workers_rss: dict[str, int] = {}
    for r in parts:
        if r.worker != "driver":
            workers_rss[r.worker] = max(workers_rss.get(r.worker, 0), r.peak_rss)
    local = [r for r in parts if r.worker == "driver"]
    return MergeResult(
        out, plan, sorted(results, key=lambda r: r.index), time.perf_counter() - t0, peak_rss_bytes(), workers_rss, len(done),
        driver_parts=len(local), driver_bytes=sum(r.part.bytes_written for r in local), parts=len(parts),
    )


def _dispatch(plan, work, actors, out_dir: str, bar) -> tuple[list, list]:
    """Run the parts on the actors (each one part at a time) and, until the actors are ready, on
    the driver's helper threads; returns (ShardResults, PartResults).

    Each part's shard is tracked so that any failure names it. Ray retries a task whose actor
    died (``max_task_retries``) on the restarted actor; what still fails is raised here.
    """
    import ray

    from mergeserve.cluster.parts import ShardAssembler

    asm = ShardAssembler(plan, work.parts, out_dir)
    plan_ref = ray.put(plan)
    # While the driver's helpers merge, an actor gets parts only once it has started (a part
    # queued behind an actor's start-up is one the helpers could have done). Otherwise every actor
    # gets its first part at once, so that parts spread over the cluster's nodes from the start.
    if work.helpers_busy:
        starting, idle = {a.ready.remote(): a for a in actors}, []
    else:
        starting, idle = {}, list(actors)
    running, parts = {}, []

    def finished(res) -> None:
        parts.append(res)
        bar.update(res.part.bytes_written)
        asm.add(res)

    while not asm.done:
        while True:  # parts the driver's helpers finished
            try:
                part, res = work.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(res, BaseException):
                raise _map_ray_error(res, plan.shards[part.shard].filename) from None
            finished(res)
        if asm.done:
            break
        while idle and (part := work.take()) is not None:
            actor = idle.pop()
            running[actor.run_part.remote(plan_ref, part, out_dir)] = (actor, part)
        refs = list(running) + list(starting)
        if not refs:
            if not work.helpers_busy and work.events.empty():
                raise ResourceError("merge stalled: no merge worker is running and parts are left")
            time.sleep(0.02)
            continue
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.02 if work.helpers_busy else None)
        for ref in ready:
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - mapped to our error types
                    raise _map_ray_error(e, "(none yet: the merge worker failed to start)") from None
                idle.append(actor)
                if not starting:
                    work.stop_helpers()  # every actor is up: they take the remaining parts
                continue
            actor, part = running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - mapped to our error types
                raise _map_ray_error(e, plan.shards[part.shard].filename) from None
            finished(res)
            idle.append(actor)
    return asm.results, parts


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
