"""``mergeserve sweep``: registered into the main CLI by ``mergeserve.cli``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="merge, evaluate and rank many variants of one recipe (on Ray)")
    p.add_argument("spec", help="sweep spec YAML (a recipe, axes, search, evaluation)")
    p.add_argument("out", help="output directory: results, plots, and variants/NAME checkpoints when written")
    p.add_argument("--address", help="Ray cluster to join: 'auto' or ray://host:port (default: start a local Ray)")
    p.add_argument("--workers", type=int, help="number of sweep actors (default: one per GPU, else per CPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished variants are skipped")
    p.add_argument("--models-dir", help="resolve the recipe's model ids under this directory first")
    p.add_argument("--serve-top", type=int, default=0, metavar="K", help="serve the best K variants side by side and load-test them")
    p.add_argument("--plan-only", action="store_true", help="list the variants (validated and planned) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(a: argparse.Namespace) -> int:
    if a.plan_only:
        from mergeserve.sweep.runner import prepare
        from mergeserve.sweep.variants import batches

        prep = prepare(a.spec, a.out, models_dir=a.models_dir, resume=True)
        spec, planned = prep.spec, prep.planned
        if prep.variants is not None:
            from pathlib import Path

            from mergeserve.merge.stage_run import STAGES_DIR
            from mergeserve.sweep.variants import stage_variants

            staged, _ = stage_variants(prep.variants, Path(a.out) / STAGES_DIR)
            print(f"{len(prep.variants)} variants of a multi-stage recipe: {len(staged)} distinct stages merged once "
                  "(each stage group reading its inputs once), then each variant's final stage")
            for v in prep.variants:
                print(f"  {v.name}: {v.label}")
            return 0
        if planned is None:
            print(f"{spec.search.kind} search: budget {spec.search.budget}, batches of {spec.batch_size} (variants chosen while running)")
            return 0
        groups = batches(planned, spec.batch_size)
        reads = sum(b[0].plan.bytes_read for b in groups)
        naive = sum(pv.plan.bytes_read for pv in planned)
        print(f"{len(planned)} variants ({sum(pv.duplicate_of is None for pv in planned)} unique) in {len(groups)} batch(es); "
              f"reads {reads / 1e9:.3f} GB vs {naive / 1e9:.3f} GB one by one")
        for pv in planned:
            dup = f"  (= {pv.duplicate_of})" if pv.duplicate_of else ""
            print(f"  {pv.name}: {pv.variant.label}{dup}")
        return 0
    from mergeserve.sweep.runner import run_sweep

    summary = run_sweep(
        a.spec, a.out, address=a.address, workers=a.workers, resume=a.resume, models_dir=a.models_dir,
        serve_top=a.serve_top, progress=not a.quiet,
    )
    print(summary["table"])
    for obj, best in summary["best"].items():
        print(f"best for {obj}: {best['name']} ({best['label']}), perplexity per token {best['ppl_token']:.3f}")
    if summary.get("read_ratio") is not None:
        print(f"read {summary['bytes_read'] / 1e9:.3f} GB of sources, {summary['read_ratio']:.3f}x the "
              f"{summary['bytes_read_naive'] / 1e9:.3f} GB one-by-one merges would read; {summary['seconds']:.1f} s")
    print(f"results: {a.out}/results.csv, results.json" + "".join(f", {p}" for p in summary.get("plots", [])))
    return 0
