"""Running a multi-stage recipe (:mod:`.stages`): each stage a merge, in topological order.

Layout while it runs: the output's staging directory ``.OUT.partial/`` holds ``stages/NAME/``,
one finished checkpoint per stage (each written atomically through its own staging directory).
When every stage is done, the final stage's files move up into ``.OUT.partial/`` and it becomes
``OUT`` atomically; ``stages/`` is deleted first unless ``keep_intermediates`` (then it stays as
``OUT/stages/NAME``). Any failure leaves nothing at ``OUT``; after bad input the staging directory
goes too, after any other failure the finished stages stay for ``--resume``.

A stage is merged by ONE call, ``runner(config, out_dir)`` (:data:`StageRunner`), so the merge
engine is replaceable: :func:`local_runner` merges in this process through :func:`.api.merge`;
``mergeserve.cluster`` passes its Ray merge. ``resume`` reuses a finished stage when its record
(``.mergeserve-stage.json``: the stage's recipe with its inputs' paths, and the runner's options)
matches, its inputs' fingerprints are unchanged and every tensor's sha256 verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergeserve.errors import ConfigError, MergeServeError, ResumeError
from mergeserve.merge.config import MergeConfig
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.reader import fingerprint, read_header
from mergeserve.merge.stages import FINAL, StageGraph, model_refs, stage_config
from mergeserve.merge.writer import StagingDir

StageRunner = Callable[[MergeConfig, Path], Any]  # merges one recipe into a new directory; returns its result
STAGES_DIR = "stages"
FINAL_DIR = "__final__"  # the unnamed stage's directory (stage names may not start with "__")
STAGE_RECORD = ".mergeserve-stage.json"
MANIFEST = "mergeserve_manifest.json"


@dataclass
class StagesResult:
    out_dir: Path
    graph: StageGraph
    results: dict[str, Any] = field(default_factory=dict)  # stage -> its runner's result (merged this run)
    reused: list[str] = field(default_factory=list)  # stages verified and reused (--resume)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"merged {len(self.graph.stages)} stages into {self.out_dir} in {self.seconds:.2f} s (final: {self.graph.final})"]
        for s in self.graph.stages:
            r = self.results.get(s.name)
            if s.name in self.reused:
                lines.append(f"  {s.name}: reused (verified) from the interrupted run")
            elif r is not None and hasattr(r, "summary"):
                lines += [f"  {s.name}: " + r.summary().splitlines()[0]]
        return "\n".join(lines)


def local_runner(options: MergeOptions) -> StageRunner:
    """A runner merging in this process with :func:`mergeserve.merge.api.merge`, following
    ``options``. The runner also carries ``check(config)`` (plan without merging) and ``options``
    (for the resume record)."""
    from mergeserve.merge.api import merge, plan_merge

    each = replace(options, overwrite=False, resume=False)  # each stage is a fresh directory

    def run(config: MergeConfig, out_dir: Path):
        return merge(config, out_dir, each)

    run.check = lambda config: plan_merge(config, each)
    run.options = _record_options(each)
    return run


def _record_options(o: MergeOptions) -> str:
    """What a finished stage's bytes depend on besides its recipe (part of its resume record)."""
    return repr((o.out_shard_size, o.out_dtype, str(o.models_dir), o.allow_pickle, o.seed))


def check_stages(graph: StageGraph, runner: StageRunner) -> None:
    """Plan every stage that reads only models (not other stages) with ``runner.check``: their
    problems (models, shapes, parameters, adapters, vocabularies) surface before any work. Stages
    reading other stages are checked when their inputs exist."""
    check = getattr(runner, "check", None)
    if check is None:
        return
    problems: list[str] = []
    for s in graph.stages:
        if s.deps:
            continue
        try:
            check(stage_config(s, {}))
        except ConfigError as e:
            problems += [f"stage {s.name}: {p}" for p in e.problems]
        except MergeServeError as e:
            if e.exit_code != 2:
                raise
            problems.append(f"stage {s.name}: {e}")
    if problems:
        raise ConfigError.from_problems(problems, "recipe")


def merge_stages(graph: StageGraph, out_dir: str | Path, runner: StageRunner, options: MergeOptions) -> StagesResult:
    """Run every stage of ``graph`` with ``runner``; the final stage becomes ``out_dir``.
    ``options``: ``overwrite``, ``resume``, ``keep_intermediates``, ``models_dir``."""
    t0 = time.perf_counter()
    check_stages(graph, runner)
    resume, keep_intermediates = options.resume, options.keep_intermediates
    staging = StagingDir(out_dir, overwrite=options.overwrite or resume, resume=resume, protect=stage_inputs(graph, options.models_dir))
    stages_dir = staging.path / STAGES_DIR
    if resume and not stages_dir.is_dir():
        staging.discard()
        raise ResumeError(f"--resume: no interrupted multi-stage run to resume at {staging.path}")
    outputs = {s.name: stages_dir / (FINAL_DIR if s.name == FINAL else s.name) for s in graph.stages}
    result = StagesResult(staging.dest, graph)
    options = getattr(runner, "options", "")
    try:
        stages_dir.mkdir(exist_ok=True)
        for s in graph.stages:
            cfg = stage_config(s, outputs)
            dest = outputs[s.name]
            key = hashlib.sha256((cfg.to_yaml() + options).encode()).hexdigest()
            if resume and _finished(dest, key):
                result.reused.append(s.name)
                continue
            shutil.rmtree(dest, ignore_errors=True)
            result.results[s.name] = runner(cfg, dest)
            (dest / STAGE_RECORD).write_text(json.dumps({"stage": s.name, "key": key}) + "\n")
        final = outputs[graph.final]
        (final / STAGE_RECORD).unlink()
        for entry in final.iterdir():
            os.replace(entry, staging.path / entry.name)
        final.rmdir()
        if keep_intermediates:
            for d in stages_dir.iterdir():
                (d / STAGE_RECORD).unlink(missing_ok=True)
        else:
            shutil.rmtree(stages_dir)
        staging.commit()
    except MergeServeError as e:
        if e.exit_code == 2 or not any(stages_dir.glob(f"*/{STAGE_RECORD}")):
            staging.discard()  # bad input: nothing may be left behind
        else:
            staging.release()
        raise
    except BaseException:
        if any(stages_dir.glob(f"*/{STAGE_RECORD}")):
            print(f"mergeserve: finished stages kept in {stages_dir}; rerun with --resume to finish", file=sys.stderr)
            staging.release()
        else:
            staging.discard()
        raise
    result.seconds = time.perf_counter() - t0
    return result


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
    except (OSError, ValueError):
        return False
    if record.get("key") != key:
        return False
    for inp in manifest.get("inputs", {}).values():
        try:
            if fingerprint(inp["path"]) != inp["fingerprint"]:
                return False
        except OSError:
            return False
    for shard, tensors in manifest.get("shards", {}).items():
        if not _verify_shard(dest / shard, tensors):
            return False
    return True


def _verify_shard(path: Path, tensors: dict[str, dict]) -> bool:
    try:
        header = read_header(path)
    except Exception:  # noqa: BLE001 - an unreadable shard means the stage is redone
        return False
    with open(path, "rb") as f:
        for name, rec in tensors.items():
            info = header.get(name)
            if info is None or list(info.shape) != rec["shape"]:
                return False
            f.seek(info.start)
            if hashlib.sha256(f.read(info.nbytes)).hexdigest() != rec["sha256"]:
                return False
    return True
