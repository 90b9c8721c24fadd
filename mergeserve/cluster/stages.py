"""A multi-stage recipe as one Ray job (``mergeserve merge MULTI.yaml OUT``).

One Ray session and one pool of merge actors (:mod:`~mergeserve.cluster.pool`) serve every stage.
The recipe is checked and the stages reading only models are planned before anything is created
(:class:`~mergeserve.merge.stage_run.StageRun`). Then the merge driver's dispatcher
(:func:`~mergeserve.cluster.driver.dispatch`) runs the parts of every stage whose inputs are
complete, side by side on the same actors; stages of one output layout form one run whose parts
merge every stage's tensors from one read of their sources. When a run's last part is in, its
stages are committed and recorded, and the stages they unblock start. With an embedded Ray, the
driver's helper threads merge the first run while Ray starts.

:func:`run_stages` does the same for any :class:`~mergeserve.merge.stage_run.StageQueue` on a
pool its caller holds (a sweep merges its variants' shared stages so).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergeserve.cluster.driver import Run
    from mergeserve.cluster.pool import WorkerPool
    from mergeserve.merge.options import MergeOptions
    from mergeserve.merge.stage_run import PlannedStage, StageQueue, StagesResult
    from mergeserve.merge.stages import StageGraph


def merge_stages_distributed(graph: StageGraph, out_dir: str | Path, options: MergeOptions) -> StagesResult:
    """Merge every stage of ``graph`` on Ray; the final stage becomes ``out_dir``. ``options``
    as for :func:`~mergeserve.cluster.driver.merge_distributed`, plus ``keep_intermediates``."""
    import ray

    from mergeserve.cluster.actors import MergeWorker
    from mergeserve.cluster.pool import WorkerPool, check_worker_count
    from mergeserve.cluster.session import ray_session
    from mergeserve.merge.api import check_device
    from mergeserve.merge.stage_run import StageRun

    check_worker_count(options.workers)
    check_device(options.device)
    run = StageRun(graph, out_dir, options)
    jobs = _Jobs(run.queue)
    try:
        first = jobs.start()
        if first and options.address is None and not ray.is_initialized() and options.device == "cpu":
            first[0].work.start_helpers(first[0].batch, first[0].dirs)  # merge while Ray starts
        if first:
            with ray_session(options.address):
                pool = WorkerPool.for_cluster(MergeWorker, options.workers)
                try:
                    jobs.dispatch(first, pool, options.progress)
                finally:
                    pool.shutdown()
        return run.commit()
    except BaseException as e:
        jobs.abandon()
        run.fail(e)
        raise


def run_stages(queue: StageQueue, pool: WorkerPool, progress: bool = True) -> None:
    """Merge every stage of ``queue`` on ``pool`` (actors with ``run_part``, see
    :class:`~mergeserve.cluster.actors.MergeWorker`); an unfinished stage leaves nothing behind."""
    jobs = _Jobs(queue)
    try:
        first = jobs.start()
        if first:
            jobs.dispatch(first, pool, progress)
    except BaseException:
        jobs.abandon()
        raise


class _Jobs:
    """The driver's runs for a stage queue: one per group of ready stages."""

    def __init__(self, queue: StageQueue):
        self.queue = queue
        self.runs: list[Run] = []
        self.groups: dict[int, tuple[list[PlannedStage], float]] = {}  # id(run) -> its stages, start time
        self.bytes_written = 0
        self.bar: Any = None

    def start(self) -> list[Run]:
        """Runs for the stages ready now (none once every stage is done)."""
        from mergeserve.cluster.driver import prepare_batch

        new = []
        for group in self.queue.ready():
            r = prepare_batch([(s.config, s.text, s.plan, s.dest) for s in group], self.queue.options_for(group),
                              name="stage " + ", ".join(s.name for s in group))
            self.runs.append(r)
            self.groups[id(r)] = (group, time.perf_counter())
            self.bytes_written += sum(s.bytes_written for s in r.batch.shards) * len(group)
            new.append(r)
        if self.bar is not None:
            self.bar.total = self.bytes_written
            self.bar.refresh()
        return new

    def dispatch(self, first: list[Run], pool: WorkerPool, progress: bool) -> None:
        from mergeserve.cluster.driver import dispatch
        from mergeserve.merge.api import progress_bar

        with progress_bar(first[0].outputs[0].plan, progress) as bar:
            bar.total = self.bytes_written
            self.bar = bar
            dispatch(first, pool, bar, on_done=self.done)

    def done(self, r: Run) -> list[Run]:
        """``r``'s stages committed and recorded; the runs they unblock."""
        from mergeserve.cluster.driver import finish_run

        group, t0 = self.groups.pop(id(r))
        for k, (stage, result) in enumerate(zip(group, finish_run(r, t0))):
            self.queue.finished(stage, result, r.bytes_read if k == 0 else 0)
        return self.start()

    def abandon(self) -> None:
        """Stop the helpers, then remove every unfinished stage's staging directory."""
        for r in self.runs:
            r.work.stop_helpers(wait=True)
        for r in self.runs:
            for out in r.outputs:
                out.stage.discard()
