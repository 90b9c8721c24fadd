"""Running a multi-stage recipe (:mod:`.stages`): stages as their inputs become ready, the ones
that write one output layout merged together.

Layout while it runs: the output's staging directory ``.OUT.partial/`` holds ``stages/NAME/``,
one finished checkpoint per stage (each written atomically through its own staging directory).
When every stage is done, the final stage's files move up into ``.OUT.partial/`` and it becomes
``OUT`` atomically; ``stages/`` is deleted first unless ``keep_intermediates`` (then it stays as
``OUT/stages/NAME``). Any failure leaves nothing at ``OUT``; after bad input the staging directory
goes too, after any other failure the finished stages stay for ``--resume``, which reuses a
finished stage when its record (``.mergeserve-stage.json``: the stage's recipe with its inputs'
paths, and the options its bytes depend on) matches, its inputs' fingerprints are unchanged and
every tensor's digest verifies.

:class:`StageRun` keeps that state; both engines drive it the same way: ask :meth:`StageRun.ready`
for the stages whose inputs are complete, planned and grouped by output layout (:func:`plan_groups`:
a group reads each source tensor once per shard, see :class:`~mergeserve.merge.multi.Batch`),
merge each group, report each stage with
:meth:`StageRun.finished`, and :meth:`StageRun.commit` at the end. :func:`merge_stages` merges
group after group in this process (``--local``); :mod:`mergeserve.cluster.stages` runs the groups
side by side as Ray work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergeserve.errors import ConfigError, MergeServeError, ResumeError
from mergeserve.merge.config import MergeConfig
from mergeserve.merge.digest import DIGEST
from mergeserve.merge.options import AUTO, DEFAULT_SHARD_SIZE, MergeOptions
from mergeserve.merge.outputs import MANIFEST, verify_tensors
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.reader import fingerprint
from mergeserve.merge.stages import FINAL, StageGraph, model_refs, stage_config
from mergeserve.merge.writer import StagingDir

STAGES_DIR = "stages"
FINAL_DIR = "__final__"  # the unnamed stage's directory (stage names may not start with "__")
STAGE_RECORD = ".mergeserve-stage.json"


@dataclass
class StagesResult:
    out_dir: Path
    graph: StageGraph
    results: dict[str, Any] = field(default_factory=dict)  # stage -> its MergeResult (merged this run)
    reused: list[str] = field(default_factory=list)  # stages verified and reused (--resume)
    groups: list[list[str]] = field(default_factory=list)  # stages merged together, in the order started
    bytes_read: int = 0  # source bytes the merged stages read
    seconds: float = 0.0

    @property
    def bytes_read_one_by_one(self) -> int:
        """What the merged stages would read merged one by one (each its own plan's reads)."""
        return sum(r.plan.bytes_read for r in self.results.values())

    def summary(self) -> str:
        lines = [f"merged {len(self.graph.stages)} stages into {self.out_dir} in {self.seconds:.2f} s (final: {self.graph.final})"]
        for s in self.graph.stages:
            r = self.results.get(s.name)
            if s.name in self.reused:
                lines.append(f"  {s.name}: reused (verified) from the interrupted run")
            elif r is not None:
                lines.append(f"  {s.name}: " + r.summary().splitlines()[0])
        shared = [", ".join(g) for g in self.groups if len(g) > 1]
        lines.append(
            f"  read {self.bytes_read / 1e9:.2f} GB of inputs; the stages one by one would read {self.bytes_read_one_by_one / 1e9:.2f} GB"
            + (f" (read together: {'; '.join(shared)})" if shared else "")
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class PlannedStage:
    """A stage ready to merge: its recipe with inputs resolved, its plan and where it goes."""

    name: str
    config: MergeConfig
    text: str
    plan: MergePlan
    dest: Path
    key: str  # of its resume record


def stage_options(options: MergeOptions) -> MergeOptions:
    """How each stage is planned and written: a fresh directory per stage (``--overwrite`` and
    ``--resume`` apply to the whole output), and one shard size for every stage so that stages
    reading the same inputs write one layout (``auto`` sizes only a single-recipe Ray merge)."""
    size = DEFAULT_SHARD_SIZE if options.out_shard_size in (None, AUTO) else options.out_shard_size
    return replace(options, overwrite=False, resume=False, out_shard_size=size)


def _record_key(config: MergeConfig, o: MergeOptions) -> str:
    """A finished stage's identity: its recipe (inputs resolved) and the options its bytes depend on."""
    depends = (o.out_shard_size, o.out_dtype, str(o.models_dir), o.allow_pickle, o.seed)
    return hashlib.sha256((config.to_yaml() + repr(depends)).encode()).hexdigest()


def _planned(name: str, config: MergeConfig, dest: Path, o: MergeOptions) -> PlannedStage:
    from mergeserve.merge.api import plan_merge

    cfg, text, plan = plan_merge(config, o)
    return PlannedStage(name, cfg, text, plan, dest, _record_key(config, o))


def check_stages(graph: StageGraph, options: MergeOptions) -> dict[str, PlannedStage]:
    """Plan every stage that reads only models (not other stages): their problems (models,
    shapes, parameters, adapters, vocabularies) surface before any work, all at once. Stages
    reading other stages are planned when their inputs exist. Returns the plans, by stage."""
    return check_queued([QueuedStage(s.name, stage_config(s, {}), s.deps, Path()) for s in graph.stages], options)


def check_queued(stages: Sequence[QueuedStage], options: MergeOptions) -> dict[str, PlannedStage]:
    """:func:`check_stages` for queued stages: those without ``deps`` planned, every problem at once."""
    o = stage_options(options)
    problems: list[str] = []
    planned = {}
    for s in stages:
        if s.deps:
            continue
        try:
            planned[s.name] = _planned(s.name, s.config, s.dest, o)
        except ConfigError as e:
            problems += [f"stage {s.name}: {p}" for p in e.problems]
        except MergeServeError as e:
            if e.exit_code != 2:
                raise
            problems.append(f"stage {s.name}: {e}")
    if problems:
        raise ConfigError.from_problems(problems, "recipe")
    return planned


def plan_groups(stages: Sequence[PlannedStage]) -> list[list[PlannedStage]]:
    """Stages grouped by output layout (:func:`~mergeserve.merge.multi.layout_key`), in order:
    each group is merged together, reading every source tensor once per position."""
    from mergeserve.merge.multi import layout_key

    groups: dict[str, list[PlannedStage]] = {}
    for s in stages:
        groups.setdefault(layout_key(s.plan), []).append(s)
    return list(groups.values())


def describe_stages(graph: StageGraph, options: MergeOptions) -> str:
    """``--plan-only``: the DAG, after planning the stages that read only models; which of them
    are merged together."""
    first = plan_groups(list(check_stages(graph, options).values()))
    together = [", ".join(s.name for s in g) for g in first if len(g) > 1]
    return graph.describe() + "".join(f"\n  merged together, each input tensor read once per shard: {t}" for t in together)


@dataclass(frozen=True)
class QueuedStage:
    """A stage to merge into ``dest`` once the stages named in ``deps`` are done."""

    name: str
    config: MergeConfig  # references to other stages resolved to their directories
    deps: tuple[str, ...]
    dest: Path


class StageQueue:
    """Stages merged as their inputs complete, each into its own directory (committed atomically),
    with a record that lets ``resume`` reuse it: the engines' side of a multi-stage merge (and of
    a sweep's shared intermediate stages).

    ``planned``: stages planned already (see :func:`check_stages`), by name.
    """

    def __init__(self, stages: Sequence[QueuedStage], options: MergeOptions, *, resume: bool = False,
                 planned: dict[str, PlannedStage] | None = None):
        self.stages = list(stages)
        self.options = stage_options(options)
        self.resume = resume
        self._early = dict(planned or {})
        self._done: set[str] = set()
        self._started: set[str] = set()
        self.results: dict[str, Any] = {}  # stage -> its MergeResult (merged this run)
        self.reused: list[str] = []  # stages verified and reused
        self.groups: list[list[str]] = []  # stages merged together, in the order started
        self.bytes_read = 0  # source bytes the merged stages read
        self._read_back = {d for s in self.stages for d in s.deps}  # stages other stages read

    def ready(self) -> list[list[PlannedStage]]:
        """Stages whose inputs are complete (not started before), planned and grouped (see
        :func:`plan_groups`). With ``resume`` a stage finished and verified before is reused."""
        out = []
        progress = True
        while progress:
            progress = False
            for s in self.stages:
                if s.name in self._started or not all(d in self._done for d in s.deps):
                    continue
                self._started.add(s.name)
                if self.resume and _finished(s.dest, _record_key(s.config, self.options)):
                    self.reused.append(s.name)
                    self._done.add(s.name)
                    progress = True  # its users may be ready now
                    continue
                shutil.rmtree(s.dest, ignore_errors=True)  # an unfinished or unverified one
                early = self._early.pop(s.name, None)
                out.append(replace(early, dest=s.dest) if early else _planned(s.name, s.config, s.dest, self.options))
        groups = plan_groups(out)
        self.groups += [[s.name for s in g] for g in groups]
        return groups

    def options_for(self, group: Sequence[PlannedStage]) -> MergeOptions:
        """How ``group`` is merged: written through the page cache when another stage reads it back."""
        return replace(self.options, read_back=any(s.name in self._read_back for s in group))

    def finished(self, stage: PlannedStage, result: Any, bytes_read: int = 0) -> None:
        """Record a merged stage (``result``: its MergeResult); ``bytes_read``: what its merge read
        (for a group merged together, give the group's reads with one of its stages)."""
        (stage.dest / STAGE_RECORD).write_text(json.dumps({"stage": stage.name, "key": stage.key}) + "\n")
        self.results[stage.name] = result
        self.bytes_read += bytes_read
        self._done.add(stage.name)

    @property
    def complete(self) -> bool:
        return len(self._done) == len(self.stages)


def merge_queue(queue: StageQueue) -> None:
    """Merge every stage of ``queue`` in this process, group after group."""
    from mergeserve.merge.api import merge_together

    while groups := queue.ready():
        for group in groups:
            results, read = merge_together([(s.config, s.text, s.plan, s.dest) for s in group], queue.options_for(group))
            for k, (s, r) in enumerate(zip(group, results)):
                queue.finished(s, r, read if k == 0 else 0)


class StageRun:
    """A multi-stage recipe being merged into ``out_dir``: the output's staging directory, its
    stages' :class:`StageQueue` (``queue``), and the final commit.

    Checks every stage reading only models before creating anything (see :func:`check_stages`).
    """

    def __init__(self, graph: StageGraph, out_dir: str | Path, options: MergeOptions):
        self.t0 = time.perf_counter()
        self.graph = graph
        self.keep_intermediates = options.keep_intermediates
        checked = check_stages(graph, options)
        self.staging = StagingDir(
            out_dir, overwrite=options.overwrite or options.resume, resume=options.resume,
            protect=stage_inputs(graph, options.models_dir),
        )
        self.stages_dir = self.staging.path / STAGES_DIR
        if options.resume and not self.stages_dir.is_dir():
            self.staging.discard()
            raise ResumeError(f"--resume: no interrupted multi-stage run to resume at {self.staging.path}")
        self.stages_dir.mkdir(exist_ok=True)
        dirs = {s.name: self.stages_dir / (FINAL_DIR if s.name == FINAL else s.name) for s in graph.stages}
        self.final = dirs[graph.final]
        self.queue = StageQueue(
            [QueuedStage(s.name, stage_config(s, dirs), s.deps, dirs[s.name]) for s in graph.stages],
            options, resume=options.resume, planned=checked,
        )

    def commit(self) -> StagesResult:
        """The final stage becomes the output (with ``stages/`` if ``keep_intermediates``)."""
        (self.final / STAGE_RECORD).unlink()
        for entry in self.final.iterdir():
            os.replace(entry, self.staging.path / entry.name)
        self.final.rmdir()
        if self.keep_intermediates:
            for d in self.stages_dir.iterdir():
                (d / STAGE_RECORD).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.stages_dir)
        out = self.staging.commit()
        q = self.queue
        return StagesResult(out, self.graph, q.results, q.reused, q.groups, q.bytes_read, time.perf_counter() - self.t0)

    def fail(self, error: BaseException) -> None:
        """After bad input nothing stays; after any other failure the finished stages stay for
        ``--resume`` (the staging directory's lock is released either way)."""
        kept = any(self.stages_dir.glob(f"*/{STAGE_RECORD}"))
        if kept and not (isinstance(error, MergeServeError) and error.exit_code == 2):
            print(f"mergeserve: finished stages kept in {self.stages_dir}; rerun with --resume to finish", file=sys.stderr)
            self.staging.release()
        else:
            self.staging.discard()


def merge_stages(graph: StageGraph, out_dir: str | Path, options: MergeOptions) -> StagesResult:
    """Merge every stage of ``graph`` in this process; the final stage becomes ``out_dir``.
    ``options`` as for a merge, plus ``overwrite``, ``resume`` and ``keep_intermediates``."""
    run = StageRun(graph, out_dir, options)
    try:
        merge_queue(run.queue)
        return run.commit()
    except BaseException as e:
        run.fail(e)
        raise


def stage_inputs(graph: StageGraph, models_dir: str | Path | None) -> list[Path]:
    """The input models (and adapters) the stages read, and ``--models-dir``: what the output must
    stay clear of (see :class:`~mergeserve.merge.writer.StagingDir`). A reference that does not
    resolve is skipped here: planning its stage reports it."""
    from mergeserve.merge.plan import resolve_model_path
    from mergeserve.merge.untrusted import model_bound

    names = {s.name for s in graph.stages}
    out = [Path(models_dir)] if models_dir else []
    for s in graph.stages:
        for ref in model_refs(s.config):
            for path in (ref.path, ref.lora):
                if path and path not in names:
                    try:
                        out.append(model_bound(resolve_model_path(path, models_dir)))
                    except MergeServeError:
                        pass
    return list(dict.fromkeys(out))


def _finished(dest: Path, key: str) -> bool:
    """A stage's checkpoint from an earlier run that can be reused: same recipe and options, same
    inputs, and every tensor's bytes as recorded."""
    try:
        record = json.loads((dest / STAGE_RECORD).read_text())
        manifest = json.loads((dest / MANIFEST).read_text())
        if record.get("key") != key:
            return False
        for inp in manifest["inputs"].values():
            if fingerprint(inp["path"]) != inp["fingerprint"]:
                return False
        return all(
            verify_tensors(dest / shard, [(name, t["shape"], t[DIGEST]) for name, t in tensors.items()])
            for shard, tensors in manifest["shards"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MergeServeError):
        return False  # anything unreadable: the stage is merged again
