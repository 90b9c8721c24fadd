"""The ``mergeserve`` command line.

Every user mistake is a :class:`~mergeserve.errors.MergeServeError`: it is printed as one line
(``mergeserve: error: ...``) and the process exits with that error's code (2 for bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mergeserve.errors import ConfigError, MergeServeError
from mergeserve.merge.options import DEFAULT_SHARD_SIZE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models from a mergekit-format YAML recipe")
    p.add_argument("config", help="recipe YAML (mergekit format; several documents: a mergekit-multi recipe)")
    p.add_argument("out", help="output directory (appears atomically when the merge succeeds)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the tensor math (default cpu)")
    p.add_argument("--out-shard-size", default=DEFAULT_SHARD_SIZE, help="max bytes per output shard, e.g. 5B, 500M (default 5B)")
    p.add_argument("--out-dtype", choices=["bfloat16", "float16", "float32", "fp8"], help="overrides the recipe's out_dtype")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--models-dir", help="resolve model ids (org/name) under this directory first")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .bin checkpoints (weights only)")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (dare, della); default 0")
    p.add_argument("--plan-only", action="store_true", help="print the plan and exit without merging")
    p.add_argument(
        "--address",
        help="merge on Ray: 'local' starts one on this machine, 'auto' or [ray://]host:port joins a cluster "
        "(default: merge in this process, or on a local Ray for --device cuda with several GPUs)",
    )
    p.add_argument("--local", action="store_true", help="merge in this process, without Ray (the default without --address)")
    p.add_argument("--workers", type=int, help="merge threads in this process, or Ray actors (default: one per CPU; on Ray one per GPU if any)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run, verifying finished shards and their inputs (or finished stages)")
    p.add_argument("--keep-intermediates", action="store_true", help="multi-stage recipes: keep each stage's checkpoint as OUT/stages/NAME")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _merge_options(a: argparse.Namespace):
    from mergeserve.merge.options import MergeOptions

    return MergeOptions(
        device=a.device, out_shard_size=a.out_shard_size, out_dtype=a.out_dtype, models_dir=a.models_dir,
        allow_pickle=a.allow_pickle, seed=a.seed, overwrite=a.overwrite, progress=not a.quiet,
        address=a.address, workers=a.workers, resume=a.resume, keep_intermediates=a.keep_intermediates,
    )


def _cmd_merge(a: argparse.Namespace) -> int:
    from mergeserve.merge.stages import load_stages

    options = _merge_options(a)
    graph = load_stages(a.config)
    if graph is not None:
        return _merge_stages(a, graph, options)
    if a.plan_only:
        from mergeserve.merge.api import plan_merge

        print(plan_merge(a.config, options)[2].describe())
        return 0
    from mergeserve.merge.api import merge, wants_ray

    _check_where(a)
    if not a.local and wants_ray(options):
        from mergeserve.cluster.driver import merge_distributed

        result = merge_distributed(a.config, a.out, options)
    else:
        result = merge(a.config, a.out, options)
    print(result.summary())
    return 0


def _check_where(a: argparse.Namespace) -> None:
    if a.local and a.address is not None:
        raise ConfigError("--local and --address exclude each other (--local: merge in this process; --address: on Ray)")


def _merge_stages(a: argparse.Namespace, graph, options) -> int:
    if a.plan_only:
        from mergeserve.merge.stage_run import describe_stages

        print(describe_stages(graph, options))
        return 0
    from mergeserve.merge.api import wants_ray

    _check_where(a)
    if a.local or not wants_ray(options):
        from mergeserve.merge.stage_run import merge_stages

        result = merge_stages(graph, a.out, options)
    else:
        from mergeserve.cluster.stages import merge_stages_distributed

        result = merge_stages_distributed(graph, a.out, options)
    print(result.summary())
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from mergeserve.merge.api import plan_merge
    from mergeserve.merge.config import load_config
    from mergeserve.merge.stages import load_stages

    graph = load_stages(a.config)
    if graph is not None:
        from mergeserve.merge.options import MergeOptions
        from mergeserve.merge.stage_run import check_stages

        if not a.schema_only:
            check_stages(graph, MergeOptions(models_dir=a.models_dir, out_dtype=a.out_dtype))
        print(f"{a.config}: valid multi-stage recipe ({len(graph.stages)} stages, final {graph.final})")
        return 0
    if a.schema_only:
        load_config(a.config)
        print(f"{a.config}: valid recipe (schema only)")
        return 0
    plan = plan_merge(a.config, models_dir=a.models_dir, out_dtype=a.out_dtype)[2]
    print(f"{a.config}: valid ({plan.method}, {len(plan.models)} models, {plan.num_layers} layers, {plan.num_tensors} tensors)")
    return 0


def _cmd_tiny(a: argparse.Namespace) -> int:
    from mergeserve.tiny_models import build_tiny_family

    fam = build_tiny_family(a.out, archs=tuple(a.arch), force=a.force)
    for arch, paths in fam.items():
        print(arch + ": " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    v = sub.add_parser("validate", help="check a recipe and its input models without merging")
    v.add_argument("config")
    v.add_argument("--models-dir")
    v.add_argument("--out-dtype", choices=["bfloat16", "float16", "float32", "fp8"])
    v.add_argument("--schema-only", action="store_true", help="check the YAML only, not the models")
    t = sub.add_parser("tiny-models", help="build the local tiny model family (tokenizer, base, two fine-tunes)")
    t.add_argument("out")
    t.add_argument("--arch", nargs="+", default=["mistral", "llama", "qwen2"], choices=["mistral", "llama", "qwen2"])
    t.add_argument("--force", action="store_true")
    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands living in other subpackages (serve, loadtest, sweep), registered if present."""
    out = []
    for mod in ("mergeserve.serve.cli", "mergeserve.loadtest.cli", "mergeserve.sweep.cli"):
        try:
            m = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):  # a missing dependency, not a missing module
                raise
            continue
        out.append(m.register)
    return out


COMMANDS = {"merge": _cmd_merge, "validate": _cmd_validate, "tiny-models": _cmd_tiny}


def main(argv: list[str] | None = None) -> int:
    return _dispatch(_parse(argv))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from mergeserve.merge.memory import tune_malloc

    tune_malloc()  # before any thread starts (see there)
    return build_parser().parse_args(argv)


def _dispatch(args: argparse.Namespace) -> int:
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        return int(handler(args) or 0)
    except MergeServeError as e:
        print(f"mergeserve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mergeserve: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``mergeserve`` command: :func:`main`, then for this module's own commands (merge,
    validate, tiny-models) a quick exit when they started no Ray.

    Unloading torch at interpreter exit takes about half a second, longer than a tiny merge. These
    commands leave nothing behind once they return (every output committed, every file closed, no
    child process; nothing of ours registers exit handlers), so the process flushes its streams and
    ends at once. The other commands (serve, loadtest, sweep) start servers, Ray and child
    processes, and exit normally.
    """
    args = _parse(None)
    code = _dispatch(args)
    if args.command not in COMMANDS or "ray" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
