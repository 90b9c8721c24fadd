"""The distributed merge driver: plan, dispatch shards to Ray actors, assemble, commit.

Flow (``mergeserve merge CONFIG OUT --address ADDRESS [--workers N] [--resume]``; without an
address the merge runs in one process, :func:`mergeserve.merge.api.merge`):

1. Validate the recipe and every input header, build the plan (no Ray needed). Ray start-up runs
   in a background thread meanwhile, so that the two overlap.
2. Connect: ``local`` starts a Ray sized to this machine (so does no address, from Python);
   ``auto`` or ``ray://host:port`` (or ``host:port``) joins an existing cluster. An unreachable
   address fails within seconds.
3. Each shard is cut into parts (runs of whole tensors, see :mod:`~mergeserve.cluster.parts`),
   so that every worker has work even when ``--out-shard-size`` makes one file. A pool of
   :class:`~mergeserve.cluster.actors.MergeWorker` actors runs the parts; with an embedded Ray the
   driver's own threads merge parts from the same queue until the actors are ready (see
   :mod:`~mergeserve.cluster.work`). Inputs must be on a filesystem every node sees (the same
   paths), and so must OUT's parent directory.
4. The driver writes index, config, tokenizer, card and manifest, then renames the staging
   directory into place. ``--resume`` reuses the staging directory of an interrupted run (see
   :mod:`mergeserve.merge.resume`): it refuses another recipe, verifies finished shards and the
   input bytes they read, and redoes the rest.

Each worker reads its parts' sources ahead of its math (:mod:`mergeserve.merge.readahead`), so the
same read pipeline runs on every node.

A multi-stage recipe (:mod:`~mergeserve.cluster.stages`) runs its stages through the same
dispatcher: :func:`prepare_batch` makes a run of stages that share their reads, :func:`dispatch`
keeps several runs going on one pool, and :func:`finish_run` commits each stage.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeserve.cluster.session import EMBEDDED, ray_session
from mergeserve.errors import ResourceError

if TYPE_CHECKING:
    from mergeserve.cluster.pool import WorkerPool
    from mergeserve.merge.api import MergeResult
    from mergeserve.merge.options import MergeOptions

# torch and the merge engine are imported on the planning thread, while Ray starts on this one:
# both take seconds, and a short merge is dominated by such fixed costs.

AUTO_SHARDS_PER_WORKER = 3


def _auto_shard_size(config: Any, options: MergeOptions) -> int:
    """Enough shards for every worker to stay busy (AUTO_SHARDS_PER_WORKER each), whole layers."""
    from mergeserve.merge.api import plan_merge
    from mergeserve.merge.options import NO_SHARDING, auto_shard_size

    _, _, probe = plan_merge(config, options, out_shard_size=NO_SHARDING)
    return auto_shard_size(probe.bytes_written, (options.workers or os.cpu_count() or 1) * AUTO_SHARDS_PER_WORKER)


def merge_distributed(config: Any, out_dir: str | Path, options: MergeOptions | None = None, **changes: Any) -> MergeResult:
    """Merge on Ray, following ``options`` or its fields given as keywords (see
    :class:`~mergeserve.merge.options.MergeOptions`); ``out_shard_size`` defaults to AUTO here."""
    from mergeserve.cluster.pool import check_worker_count
    from mergeserve.merge.options import MergeOptions

    t0 = time.perf_counter()
    o = MergeOptions.of(options, **changes)
    check_worker_count(o.workers)
    prep = _Preparation(config, out_dir, o)
    handed = False
    try:
        import ray

        embedded = o.address in (None, EMBEDDED) and not ray.is_initialized()
        prep.decide(helpers=embedded and o.device == "cpu")
        with ray_session(o.address):
            from mergeserve.cluster.actors import MergeWorker
            from mergeserve.cluster.pool import WorkerPool

            pool = WorkerPool.for_cluster(MergeWorker, o.workers)  # their start-up overlaps the rest of the planning
            try:
                run = prep.result()
                handed = True  # from here _run commits, keeps or discards the staging directory
                return _run(run, pool, o.progress, t0, _where(embedded, o.address, pool))
            finally:
                prep.stop()
                pool.shutdown()
    finally:
        prep.stop()
        if not handed:  # failed before the first tensor (e.g. an unreachable --address): leave nothing
            prep.abandon()


@dataclass
class Output:
    """One checkpoint a run writes: its recipe, plan and staging directory."""

    cfg: Any
    text: str
    plan: Any
    stage: Any  # the StagingDir


@dataclass
class Run:
    """What a merge needs once planned: see :func:`_prepare_run` (one recipe) and
    :func:`prepare_batch` (several, sharing their reads)."""

    outputs: list[Output]
    batch: Any  # the merge.multi.Batch of the outputs' plans
    done: dict  # shard index -> ShardResult reused from an interrupted run (one recipe only)
    work: Any  # the PartQueue
    name: str = ""  # names the run in errors (a multi-stage recipe's stages)
    parts: list = field(default_factory=list)  # PartResults merged
    asm: Any = None  # the ShardAssembler, once dispatched
    direct: bool = True  # O_DIRECT writes; False for outputs read back at once (MergeOptions.read_back)

    @property
    def dirs(self) -> list[str]:
        return [str(o.stage.path) for o in self.outputs]

    @property
    def bytes_read(self) -> int:
        """Source bytes the run's parts read (each distinct source tensor once per position)."""
        return self.asm.bytes_read if self.asm is not None else 0

    def label(self, part: Any) -> str:
        where = f"shard {self.batch.shards[part.shard].filename}"
        return f"{self.name}: {where}" if self.name else where


class _Preparation:
    """Plans on a helper thread while Ray starts on the caller's.

    (Not the other way round: Ray ties its GCS and raylet to the starting thread with
    PR_SET_PDEATHSIG, so a Ray started on a short-lived thread dies with that thread.) Told to by
    :meth:`decide` (an embedded Ray), the planning thread then starts the driver's helpers,
    which merge parts until the actors are up (see cluster.work).
    """

    def __init__(self, *args: Any):
        self._decided = threading.Event()
        self._helpers = False
        self._run: Run | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._prepare, args=args, name="mergeserve-plan", daemon=True)
        self._thread.start()

    def _prepare(self, *args: Any) -> None:
        try:
            self._run = _prepare_run(*args)
            self._decided.wait()
            if self._helpers:
                self._run.work.start_helpers(self._run.batch, self._run.dirs)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def decide(self, helpers: bool) -> None:
        if not self._decided.is_set():
            self._helpers = helpers
            self._decided.set()

    def result(self) -> Run:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._run is not None
        return self._run

    def abandon(self) -> None:
        """Remove what planning created (see :func:`~mergeserve.merge.resume.abandon`), once it has stopped."""
        from mergeserve.merge.resume import abandon

        if self._run is not None:
            abandon(self._run.outputs[0].stage)

    def stop(self) -> None:
        """Wait for the planning thread, then for the helpers' parts in progress."""
        self.decide(False)
        self._thread.join()
        if self._run is not None:
            self._run.work.stop_helpers(wait=True)


def _prepare_run(config: Any, out_dir: str | Path, o: MergeOptions) -> Run:
    """Everything before the first tensor: plan, staging directory, resume check, parts, shard files."""
    from mergeserve.cluster.parts import prepare_shard, split_parts
    from mergeserve.cluster.work import PartQueue
    from mergeserve.merge.api import check_device, plan_merge, protected_inputs
    from mergeserve.merge.multi import Batch
    from mergeserve.merge.options import AUTO
    from mergeserve.merge.resume import abandon, start_run
    from mergeserve.merge.writer import StagingDir

    if o.out_shard_size in (None, AUTO):
        o = replace(o, out_shard_size=_auto_shard_size(config, o))
    cfg, text, plan = plan_merge(config, o)
    if o.device != "cpu":
        check_device(o.device)
    stage = StagingDir(out_dir, overwrite=o.overwrite or o.resume, resume=o.resume, protect=protected_inputs(plan, o.models_dir))
    try:
        done = start_run(stage.path, plan, o.resume)
        todo = [s for s in plan.shards if s.index not in done]
        for s in todo:
            prepare_shard(stage.path, s)
        parts = split_parts(todo, max(o.workers or 0, os.cpu_count() or 1))
    except BaseException:
        abandon(stage)
        raise
    return Run([Output(cfg, text, plan, stage)], Batch.of([plan]), done, PartQueue(parts))


def _where(embedded: bool, address: str | None, pool: WorkerPool) -> str:
    import ray

    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    workers = f"{len(pool.actors)} worker(s) on {nodes} node(s)"
    return f"on a Ray started on this machine: {workers}" if embedded else f"on the Ray cluster at {address or 'this driver'}: {workers}"


def prepare_batch(planned: list[tuple[Any, str, Any, Path]], o: MergeOptions, name: str = "") -> Run:
    """A run merging several recipes of one output layout together (see merge.multi.Batch):
    ``planned`` holds (config, recipe text, plan, output directory) each; every output gets a
    fresh staging directory and its shard files. Nothing is left behind if this fails."""
    from mergeserve.cluster.parts import prepare_shard, split_parts
    from mergeserve.cluster.work import PartQueue
    from mergeserve.merge.api import protected_inputs
    from mergeserve.merge.multi import Batch
    from mergeserve.merge.writer import StagingDir

    batch = Batch.of([plan for _, _, plan, _ in planned])
    outputs: list[Output] = []
    try:
        for cfg, text, plan, out_dir in planned:
            stage = StagingDir(out_dir, protect=protected_inputs(plan, o.models_dir))
            outputs.append(Output(cfg, text, plan, stage))
            for s in plan.shards:
                prepare_shard(stage.path, s)
    except BaseException:
        for out in outputs:
            out.stage.discard()
        raise
    parts = PartQueue(split_parts(batch.shards, max(o.workers or 0, os.cpu_count() or 1)))
    return Run(outputs, batch, {}, parts, name, direct=not o.read_back)


def _run(run: Run, pool: WorkerPool, progress: bool, t0: float, where: str) -> MergeResult:
    from mergeserve.merge.api import progress_bar
    from mergeserve.merge.resume import kept_for_resume

    out = run.outputs[0]
    with kept_for_resume(out.stage):
        try:
            with progress_bar(out.plan, progress) as bar:
                bar.update(sum(r.bytes_written for r in run.done.values()))
                if run.work.parts:
                    dispatch([run], pool, bar)
            (result,) = finish_run(run, t0, where)
            return result
        finally:
            run.work.stop_helpers(wait=True)  # nothing may write into the staging directory after this


def finish_run(run: Run, t0: float, where: str = "") -> list[MergeResult]:
    """Write each output's index, config, tokenizer, card and manifest, and commit it."""
    from mergeserve.merge.api import MergeResult
    from mergeserve.merge.memory import peak_rss_bytes
    from mergeserve.merge.outputs import write_metadata
    from mergeserve.merge.phases import summed
    from mergeserve.merge.resume import clear_run_state

    workers_rss: dict[str, int] = {}
    for r in run.parts:
        if r.worker != "driver":
            workers_rss[r.worker] = max(workers_rss.get(r.worker, 0), r.peak_rss)
    local = [r for r in run.parts if r.worker == "driver"]
    results = []
    for k, o in enumerate(run.outputs):
        merged = run.asm.results[k] if run.asm is not None else []
        shards = sorted([*run.done.values(), *merged], key=lambda r: r.index)
        write_metadata(o.stage.path, o.cfg, o.text, o.plan, shards, seconds=time.perf_counter() - t0)
        clear_run_state(o.stage.path, o.plan)
        results.append(MergeResult(
            o.stage.commit(), o.plan, shards, time.perf_counter() - t0, peak_rss_bytes(), workers_rss, len(run.done),
            driver_parts=len(local), driver_bytes=sum(r.part.bytes_written for r in local), parts=len(run.parts),
            where=where, cpu=summed(r.cpu for r in run.parts), read_wait=sum(r.read_wait for r in run.parts),
        ))
    return results


def dispatch(runs: list[Run], pool: WorkerPool, bar, on_done: Callable[[Run], list[Run]] | None = None) -> None:
    """Run the parts of ``runs`` on the pool's actors (each one part at a time) and, until the
    actors are ready, on the driver's helper threads (of a run that started them).

    Parts are taken from the runs in the order they started, so runs that do not depend on each
    other (the independent stages of a multi-stage recipe) share the actors. A run whose last
    part is in is handed to ``on_done``, which returns the runs to start next. Each part's shard
    is named in any failure. Ray retries a task whose actor died on the restarted actor (see
    cluster.pool); what still fails is raised here.
    """
    import ray

    from mergeserve.cluster.parts import ShardAssembler
    from mergeserve.cluster.pool import map_ray_error

    active: list[Run] = []
    refs: dict[int, Any] = {}

    def start(new: list[Run]) -> None:
        for run in new:
            run.asm = ShardAssembler(run.batch, run.work.parts, run.dirs)
            refs[id(run)] = ray.put(run.batch)
            active.append(run)

    def finished(run: Run, res) -> None:
        run.parts.append(res)
        bar.update(res.part.bytes_written * len(run.outputs))
        run.asm.add(res)

    def take() -> tuple[Run, Any] | None:
        for run in active:
            if (part := run.work.take()) is not None:
                return run, part
        return None

    start(runs)
    # While the driver's helpers merge, an actor gets parts only once it has started (a part
    # queued behind an actor's start-up is one the helpers could have done). Otherwise every actor
    # gets its first part at once, so that parts spread over the cluster's nodes from the start.
    if any(r.work.helpers_busy for r in active):
        pool.hold_until_ready()
    while active:
        for run in active:
            for part, res in run.work.finished():  # parts the driver's helpers finished
                if isinstance(res, BaseException):
                    raise map_ray_error(res, run.label(part)) from None
                finished(run, res)
        for run in [r for r in active if r.asm.done]:
            active.remove(run)
            refs.pop(id(run))
            if on_done is not None:
                start(on_done(run))
        if not active:
            break
        while pool.idle and (item := take()) is not None:
            run, part = item
            pool.submit("run_part", (refs[id(run)], part, run.dirs, run.direct), (run, part), run.label(part))
        helpers = any(r.work.helpers_busy for r in active)
        if not pool.busy:
            if not helpers and all(r.work.events.empty() for r in active):
                raise ResourceError("merge stalled: no merge worker is running and parts are left")
            time.sleep(0.02)
            continue
        got = pool.next(timeout=0.02 if helpers else None)
        if not pool.starting:
            for r in active:
                r.work.stop_helpers()  # every actor is up: they take the remaining parts
        if got is not None:
            (run, _), res = got
            finished(run, res)
