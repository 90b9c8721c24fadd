"""The sweep driver: ``mergeserve sweep SWEEP.yaml OUT_DIR [--address ...] [--resume] [--serve-top K]``.

1. Load the spec, apply every variant's axis values to the recipe, and validate and plan every
   variant (grid and random searches) before any work: bad axes, empty grids, a budget below 1,
   missing evaluation files and invalid variants (named) fail here, with every problem at once.
2. Identical variants (equal plans) are merged once; the others are grouped by structure into
   batches of ``batch_size``. A batch is merged shard by shard on the cluster's worker pool
   (:mod:`mergeserve.cluster.pool`, actors of :mod:`mergeserve.sweep.worker`): each task reads a
   shard's source tensors ONCE and computes that shard for every variant of the batch, so each
   source byte is read ceil(variants / batch_size) times instead of once per variant.
3. ``output: none`` scores each batch in memory on the actor that merged it (nothing written);
   otherwise each variant's shards go to ``OUT/variants/NAME`` (atomically committed when all are
   written) and the checkpoint is then scored on an actor.
4. Adaptive search (tpe, cmaes) runs in rounds: ask a batch, merge and score it, tell.
5. Results: ``results.jsonl`` (one line per finished variant: ``--resume`` skips those), then
   ``results.csv``, ``results.json`` (best per objective, Pareto set, bytes read vs the naive
   plan) and ``pareto.png`` / ``tradeoff.png``. ``--serve-top K`` serves the best K side by side
   and load-tests them (:mod:`mergeserve.sweep.serve_top`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mergeserve.errors import ConfigError, OutputExistsError
from mergeserve.merge.options import AUTO, NO_SHARDING, MergeOptions, auto_shard_size
from mergeserve.merge.stage_run import STAGES_DIR  # OUT/stages/NAME-HASH: a multi-stage recipe's shared stages
from mergeserve.sweep.spec import SweepSpec

if TYPE_CHECKING:
    from mergeserve.cluster.pool import WorkerPool


@dataclass
class SweepRun:
    """What the driver keeps while a sweep runs."""

    out: Path
    spec: SweepSpec
    texts: dict[str, str]
    options: MergeOptions  # how every variant is planned (models_dir, out_dtype, seed, shard size)
    rows: dict[str, dict] = field(default_factory=dict)  # name -> result row
    bytes_read: int = 0
    bytes_naive: int = 0

    def record(self, row: dict) -> None:
        self.rows[row["name"]] = row
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


@dataclass(frozen=True)
class Prepared:
    """A sweep checked and (grid, random) planned, before any work: see :func:`prepare`."""

    spec: SweepSpec
    root: Path  # the spec's directory, which its relative paths start from
    recipe: dict
    texts: dict[str, str]  # evaluation texts by name
    options: MergeOptions  # how every variant is planned
    planned: list | None  # PlannedVariants; None for adaptive search (chosen while running) and multi-stage recipes
    variants: list | None = None  # a multi-stage recipe's grid or random Variants: planned once their stages are merged


def _problems(spec: SweepSpec, root: Path, recipe: dict) -> tuple[list[str], dict[str, Path]]:
    """What is wrong with the spec before planning, and its evaluation text files by name."""
    from mergeserve.sweep.variants import check_axes

    problems = check_axes(spec, recipe)
    files = {k: (Path(v) if Path(v).is_absolute() else root / v) for k, v in spec.eval.texts.items()}
    for k, f in files.items():
        if not f.is_file():
            problems.append(f"eval.texts.{k}: file not found: {f}")
    if spec.eval.backend == "vllm" and spec.output == "none":
        problems.append("eval.backend: vllm scores written checkpoints; set output to a dtype (e.g. bfloat16)")
    if spec.search.kind in ("tpe", "cmaes") and not files:
        problems.append(f"eval.texts: {spec.search.kind} search needs texts to score variants")
    obj = spec.search.objective
    if obj != "mean" and obj not in files:
        problems.append(f"search.objective: {obj!r} is not one of eval.texts ({', '.join(files) or 'none'}) or 'mean'")
    return problems, files


def prepare(spec_path: str | Path, out_dir: str | Path, *, models_dir: str | None = None, resume: bool = False) -> Prepared:
    """Every check that needs no Ray; the grid or random variants planned (a multi-stage recipe's:
    their stages that read only models)."""
    from mergeserve.eval.perplexity import read_texts
    from mergeserve.sweep.spec import load_spec
    from mergeserve.sweep.variants import grid_variants, is_multi_stage, load_recipe, make_variant, plan_variants, random_variants

    spec, root = load_spec(spec_path)
    recipe = load_recipe(spec, root)
    problems, files = _problems(spec, root, recipe)
    if problems:
        raise ConfigError.from_problems(list(dict.fromkeys(problems)), str(spec_path))
    texts = read_texts(files)
    if models_dir is None and spec.models_dir:
        models_dir = str(Path(spec.models_dir) if Path(spec.models_dir).is_absolute() else root / spec.models_dir)
    out = Path(out_dir)
    if not resume and (out / "results.jsonl").exists():
        raise OutputExistsError(f"{out} holds an earlier sweep's results: pass --resume to continue it, or choose another OUT_DIR")
    options = MergeOptions(models_dir=models_dir, out_dtype=None if spec.output == "none" else spec.output, seed=spec.seed)
    ends = [[(ax.values[0] if ax.values else ax.low) for ax in spec.axes], [(ax.values[-1] if ax.values else ax.high) for ax in spec.axes]]
    multi = is_multi_stage(recipe)
    # adaptive search: both ends of every range are checked before any work
    written = _check(out, [make_variant(i, recipe, spec.axes, v) for i, v in enumerate(ends)], options, multi)
    shard: int | str = spec.out_shard_size
    if shard == AUTO:  # enough shards for every CPU to write one, two each
        shard = auto_shard_size(written, 2 * (os.cpu_count() or 1))
    options = replace(options, out_shard_size=shard)
    if spec.search.kind not in ("grid", "random"):
        return Prepared(spec, root, recipe, texts, options, None)
    variants = grid_variants(spec, recipe) if spec.search.kind == "grid" else random_variants(spec, recipe)
    if multi:
        _check(out, variants, options, multi)
        return Prepared(spec, root, recipe, texts, options, None, variants)
    return Prepared(spec, root, recipe, texts, options, plan_variants(variants, options))


def _check(out: Path, variants: list, options: MergeOptions, multi: bool) -> int:
    """Validate and plan ``variants`` (of a multi-stage recipe: their graphs, and their stages
    that read only models); the bytes one of them writes (for ``out_shard_size: auto``)."""
    from mergeserve.merge.stage_run import check_queued
    from mergeserve.sweep.variants import plan_variants, stage_variants

    probe = replace(options, out_shard_size=NO_SHARDING)
    if not multi:
        return plan_variants(variants, probe)[0].plan.bytes_written
    staged, _ = stage_variants(variants, out / STAGES_DIR)
    checked = check_queued(staged, _stage_options(probe))
    return max(s.plan.bytes_written for s in checked.values())  # a stage of the same models: about the final's size


def _stage_options(options: MergeOptions) -> MergeOptions:
    """How a multi-stage sweep's shared stages are merged: as their recipes say (the spec's
    ``output`` dtype is the variants' own)."""
    return replace(options, out_dtype=None)


def _plan(run: SweepRun, pool: WorkerPool, variants: list, known: dict | None = None) -> list:
    """``variants`` planned; a multi-stage recipe's shared stages merged first (on ``pool``, each
    distinct one once, kept under ``OUT/stages`` and reused once verified)."""
    from mergeserve.sweep.variants import is_multi_stage, plan_variants

    if is_multi_stage(variants[0].recipe):
        from mergeserve.cluster.stages import run_stages
        from mergeserve.merge.stage_run import StageQueue
        from mergeserve.sweep.variants import stage_variants

        staged, variants = stage_variants(variants, run.out / STAGES_DIR)
        queue = StageQueue(staged, _stage_options(run.options), resume=True)
        run_stages(queue, pool, progress=False)
        run.bytes_read += queue.bytes_read
        run.bytes_naive += sum(r.plan.bytes_read for r in queue.results.values())
    return plan_variants(variants, run.options, known=known)


def run_sweep(
    spec_path: str | Path,
    out_dir: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    models_dir: str | None = None,
    serve_top: int = 0,
    progress: bool = True,
) -> dict:
    """Run a sweep; returns the summary written to ``OUT/results.json``."""
    from mergeserve.cluster.pool import check_worker_count

    t0 = time.perf_counter()
    check_worker_count(workers)
    if serve_top < 0:
        raise ConfigError(f"--serve-top: must be at least 0, got {serve_top}")
    prep = prepare(spec_path, out_dir, models_dir=models_dir, resume=resume)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    run = SweepRun(out, prep.spec, prep.texts, prep.options)
    top = _execute(run, prep, _load_done(out) if resume else {}, address, workers, serve_top, progress)
    summary = _report(run, time.perf_counter() - t0)
    if serve_top:
        from mergeserve.sweep.serve_top import serve_and_loadtest

        chosen = {pv.name: run.rows[pv.name]["checkpoint"] for pv in top}
        summary["loadtest"] = serve_and_loadtest(chosen, out / "loadtest", progress=progress)
    return summary


def _execute(run: SweepRun, prep: Prepared, done: dict, address: str | None, workers: int | None, serve_top: int,
             progress: bool) -> list:
    """Merge and score every variant on the cluster's worker pool; returns the top ``serve_top``
    variants, written."""
    from tqdm import tqdm

    from mergeserve.cluster.pool import WorkerPool
    from mergeserve.cluster.session import ray_session
    from mergeserve.sweep.worker import SweepWorker

    with ray_session(address):
        pool = WorkerPool.for_cluster(SweepWorker, workers)
        try:
            listed = prep.planned if prep.planned is not None else prep.variants
            total = len(listed) if listed is not None else (run.spec.search.budget or 0)
            with tqdm(total=total, desc="variants", unit="variant", position=0, disable=not progress, dynamic_ncols=True) as vbar, \
                 tqdm(desc="shards", unit="shard", position=1, disable=not progress, dynamic_ncols=True, leave=False) as sbar:
                if prep.planned is not None:
                    _run_variants(run, pool, prep.planned, done, vbar, sbar)
                elif prep.variants is not None:
                    _run_variants(run, pool, _plan(run, pool, prep.variants), done, vbar, sbar)
                else:
                    _run_adaptive(run, pool, prep.recipe, done, vbar, sbar)
            top = _top(run, serve_top)
            if top and run.spec.output == "none":  # the winners were scored in memory: write them now
                from mergeserve.sweep.variants import batches

                read = run.bytes_read  # not part of the sweep's own reads
                _write_checkpoints(run, pool, batches(top, len(top)), sbar=None)
                run.bytes_read = read
            return top
        finally:
            pool.shutdown()


def _report(run: SweepRun, seconds: float) -> dict:
    """results.csv, results.json and the plots; the summary, with the terminal table."""
    from mergeserve.sweep.results import table, write_report

    axes = [ax.label for ax in run.spec.axes]
    rows = list(run.rows.values())
    summary_extra = {
        "bytes_read": run.bytes_read, "bytes_read_naive": run.bytes_naive,
        "read_ratio": round(run.bytes_read / run.bytes_naive, 4) if run.bytes_naive else None,
        "seconds": round(seconds, 2), "output": run.spec.output,
    }
    summary = write_report(run.out, rows, axes, summary_extra)
    summary["table"] = table(rows, axes)
    return summary


def _load_done(out: Path) -> dict[str, dict]:
    """content key -> finished row, from an earlier run's results.jsonl."""
    done = {}
    f = out / "results.jsonl"
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if row.get("content"):
                done[row["content"]] = row
    return done


def _names(batch: list) -> str:
    """A batch's variants in an error message: v003, or v003-v010."""
    return batch[0].name if len(batch) == 1 else f"{batch[0].name}-{batch[-1].name}"


def _row(pv, scores: dict | None, checkpoint: str | None, extra: dict | None = None) -> dict:
    from mergeserve.sweep.variants import variant_record

    return {**variant_record(pv), "scores": scores, "checkpoint": checkpoint, **(extra or {})}


def _run_variants(run: SweepRun, pool: WorkerPool, planned: list, done: dict, vbar, sbar) -> None:
    """Merge (and score) every planned variant not finished before; record duplicates too."""
    from mergeserve.sweep.variants import batches

    run.bytes_naive += sum(pv.plan.bytes_read for pv in planned)
    todo = []
    for pv in planned:
        prev = done.get(pv.content)
        if prev is not None and (run.spec.output == "none" or (prev.get("checkpoint") and Path(prev["checkpoint"]).is_dir())):
            run.rows[pv.name] = {**prev, "name": pv.name, "label": pv.variant.label}
            vbar.update(1)
        else:
            todo.append(pv)
    groups = batches(todo, run.spec.batch_size)
    if run.spec.output == "none":
        for b in groups:
            pool.submit("merge_score", ([pv.plan for pv in b], run.texts, run.spec.eval), ("batch", b), f"batch {_names(b)}")
        sbar.reset(total=sum(len(b[0].plan.shards) for b in groups))
        while pool.busy:
            (_, b), (scores, read) = pool.next()
            run.bytes_read += read
            sbar.update(len(b[0].plan.shards))
            for pv, sc in zip(b, scores):
                run.record(_row(pv, sc if run.texts else None, None))
                vbar.update(1)
    else:
        _write_checkpoints(run, pool, groups, sbar, vbar=vbar, score=bool(run.texts))
    for pv in todo:  # duplicates share their original's result
        if pv.duplicate_of is not None and pv.duplicate_of in run.rows:
            orig = run.rows[pv.duplicate_of]
            run.record({**_row(pv, orig.get("scores"), orig.get("checkpoint")), "lm_eval": orig.get("lm_eval")})
            vbar.update(1)


def _write_checkpoints(run: SweepRun, pool: WorkerPool, groups: list, sbar, vbar=None, score: bool = False) -> None:
    """Merge batches to OUT/variants/NAME shard by shard; score each checkpoint once committed."""
    from mergeserve.merge.outputs import write_metadata
    from mergeserve.merge.writer import StagingDir

    stages, results, left = {}, {}, {}
    for b in groups:
        for pv in b:
            stages[pv.name] = StagingDir(run.out / "variants" / pv.name, overwrite=True)
            results[pv.name], left[pv.name] = [], len(pv.plan.shards)
        for k in range(len(b[0].plan.shards)):
            filename = b[0].plan.shards[k].filename
            pool.submit("merge_shard", ([pv.plan for pv in b], k, [str(stages[pv.name].path) for pv in b]),
                        ("shard", b), f"shard {filename} of batch {_names(b)}")
    if sbar is not None:
        sbar.reset(total=sum(len(b[0].plan.shards) for b in groups))
    try:
        while pool.busy:
            ctx, res = pool.next()
            if ctx[0] == "score":
                pv, path = ctx[1], ctx[2]
                run.record(_row(pv, res["scores"], path, {"lm_eval": res.get("lm_eval")}))
                if vbar is not None:
                    vbar.update(1)
                continue
            _, b = ctx
            shard_results, read = res
            run.bytes_read += read
            if sbar is not None:
                sbar.update(1)
            for pv, sr in zip(b, shard_results):
                results[pv.name].append(sr)
                left[pv.name] -= 1
                if left[pv.name] == 0:
                    write_metadata(stages[pv.name].path, pv.config, pv.recipe_text, pv.plan, results[pv.name], seconds=0.0)
                    path = str(stages[pv.name].commit())
                    if score:
                        pool.submit("score_dir", (path, run.texts, run.spec.eval), ("score", pv, path), f"variant {pv.name}")
                    else:
                        prev = run.rows.get(pv.name, {})
                        run.record({**_row(pv, prev.get("scores"), path), "lm_eval": prev.get("lm_eval")})
                        if vbar is not None:
                            vbar.update(1)
    except BaseException:
        for name, st in stages.items():
            if left.get(name):
                st.discard()  # no half-written checkpoint is left behind
        raise


def _run_adaptive(run: SweepRun, pool: WorkerPool, recipe: dict, done: dict, vbar, sbar) -> None:
    from mergeserve.sweep.search import AdaptiveSearch, objective_value
    from mergeserve.sweep.variants import make_variant

    spec = run.spec
    search = AdaptiveSearch(spec)
    index, known = 0, {}
    while not search.done:
        asked = search.ask(spec.batch_size)
        variants = [make_variant(index + i, recipe, spec.axes, vals) for i, (_, vals) in enumerate(asked)]
        index += len(asked)
        planned = _plan(run, pool, variants, known)
        for pv in planned:
            known.setdefault(pv.content, pv.name)
        _run_variants(run, pool, planned, done, vbar, sbar)
        for (trial, _), pv in zip(asked, planned):
            search.tell(trial, objective_value(spec, run.rows[pv.name]["scores"]))


def _top(run: SweepRun, k: int) -> list:
    """The best ``k`` distinct scored variants by the search objective, planned again."""
    if k <= 0:
        return []
    from mergeserve.sweep.results import rank
    from mergeserve.sweep.variants import Variant, plan_variants

    rows = [r for r in rank(list(run.rows.values()), run.spec.search.objective) if not r.get("duplicate_of") and r.get("scores")]
    if len(rows) < k:
        raise ConfigError(f"--serve-top {k}: the sweep has only {len(rows)} distinct scored variants")
    variants = [Variant(r["name"], tuple(r["values"].items()), r["recipe"]) for r in rows[:k]]
    return plan_variants(variants, run.options)
