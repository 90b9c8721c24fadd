"""The Python API behind ``mergeserve merge`` and ``mergeserve validate``.

Example::

    from mergeserve.merge.api import merge, validate
    validate("configs/tiny/marcoro14-slerp.yaml")           # raises ConfigError / InputError
    result = merge("configs/tiny/marcoro14-slerp.yaml", "out/merged", out_shard_size="1B")
    # or: merge(..., MergeOptions(out_shard_size="1B", seed=1))
    print(result.summary())

Everything the recipe and the inputs can get wrong is checked (config schema, methods and
parameters, layer ranges, model files' headers, shapes, architectures, tokenizer) before the
first tensor is merged; the checkpoint then appears atomically at ``out_dir``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeserve.errors import ConfigError
from mergeserve.merge.config import MergeConfig, load_config, parse_config
from mergeserve.merge.execute import SourceCache
from mergeserve.merge.executor import ShardResult, run_shard, shard_keys
from mergeserve.merge.memory import peak_rss_bytes
from mergeserve.merge.options import MergeOptions, parse_size
from mergeserve.merge.outputs import check_tokenizer, write_metadata
from mergeserve.merge.phases import describe, summed
from mergeserve.merge.plan import MergePlan, build_plan
from mergeserve.merge.readahead import READ_THREADS, ReadAhead
from mergeserve.merge.resume import abandon, clear_run_state, kept_for_resume, start_run, write_done_record
from mergeserve.merge.untrusted import model_bound
from mergeserve.merge.writer import StagingDir


def _as_config(config: str | Path | MergeConfig | dict) -> tuple[MergeConfig, str]:
    if isinstance(config, MergeConfig):
        return config, config.to_yaml()
    if isinstance(config, dict):
        c = parse_config(config)
        return c, c.to_yaml()
    return load_config(config)


def plan_merge(
    config: str | Path | MergeConfig | dict, options: MergeOptions | None = None, **changes: Any
) -> tuple[MergeConfig, str, MergePlan]:
    """Validate the recipe against its inputs and return (config, recipe text, plan).

    The plan follows ``options`` (or its fields given as keywords): ``out_shard_size``,
    ``out_dtype``, ``models_dir``, ``allow_pickle``, ``seed``.
    """
    o = MergeOptions.of(options, **changes)
    cfg, text = _as_config(config)
    plan = build_plan(
        cfg, models_dir=o.models_dir, out_dtype=o.out_dtype, shard_size=parse_size(o.out_shard_size), seed=o.seed,
        allow_pickle=o.allow_pickle,
    )
    check_tokenizer(cfg, plan)
    return cfg, text, plan


def validate(config: str | Path | MergeConfig | dict, options: MergeOptions | None = None, **changes: Any) -> MergePlan:
    """Run every check ``merge`` runs before its first tensor; returns the plan."""
    return plan_merge(config, options, **changes)[2]


@dataclass
class MergeResult:
    out_dir: Path
    plan: MergePlan
    shards: list[ShardResult]
    seconds: float
    peak_rss: int
    workers: dict[str, int] = field(default_factory=dict)  # worker -> peak RSS bytes
    resumed: int = 0  # shards reused (checksums verified) from an interrupted run
    parts: int = 0  # distributed: units of work (runs of tensors) the shards were cut into
    driver_parts: int = 0  # distributed: parts the driver merged itself while Ray started
    driver_bytes: int = 0
    where: str = ""  # where the work ran, as the summary says it
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds by phase of this run's merging
    read_wait: float = 0.0  # seconds the merge threads waited for reads, summed over them

    @property
    def gb_per_s(self) -> float:
        return (self.plan.bytes_read + self.plan.bytes_written) / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        rate = f"{self.gb_per_s:.2f} GB/s" if self.gb_per_s >= 0.1 else f"{self.gb_per_s * 1000:.0f} MB/s"
        lines = [
            f"merged {self.plan.num_tensors} tensors ({self.plan.method}, {self.plan.num_layers} layers) "
            f"into {self.out_dir} in {self.seconds:.2f} s",
            f"  read {self.plan.bytes_read / 1e9:.2f} GB, wrote {self.plan.bytes_written / 1e9:.2f} GB "
            f"in {len(self.shards)} shard(s): {rate}",
        ]
        if self.where:
            lines.append(f"  ran {self.where}")
        if self.cpu:
            lines.append(f"  CPU-seconds by phase: {describe(self.cpu)}; the merge waited {self.read_wait:.1f} s for reads")
        lines.append(f"  peak memory: driver {self.peak_rss / 2**30:.2f} GiB")
        for w, rss in sorted(self.workers.items()):
            lines.append(f"  peak memory: worker {w} {rss / 2**30:.2f} GiB")
        if self.parts:
            lines.append(
                f"  parts: {self.parts}, of which the driver merged {self.driver_parts} "
                f"({self.driver_bytes / 1e9:.2f} GB) while the Ray workers started"
            )
        if self.resumed:
            lines.append(f"  resumed: reused {self.resumed} verified shard(s), merged {len(self.shards) - self.resumed}")
        return "\n".join(lines)


def progress_bar(plan: MergePlan, enabled: bool):
    """A bar over the bytes the plan writes (update it with each tensor's or part's bytes)."""
    from tqdm import tqdm

    return tqdm(
        total=plan.bytes_written, unit="B", unit_scale=True, desc="merging", disable=not enabled,
        dynamic_ncols=True, leave=False,
    )


def merge(
    config: str | Path | MergeConfig | dict, out_dir: str | Path, options: MergeOptions | None = None, **changes: Any
) -> MergeResult:
    """Merge in this process (no Ray), following ``options`` or its fields given as keywords (see
    :class:`~mergeserve.merge.options.MergeOptions`; ``workers`` is the number of merge threads,
    ``address`` is for :func:`mergeserve.cluster.driver.merge_distributed`).

    Shards are merged one after the other, each by ``workers`` threads fed by one read-ahead
    (:mod:`.readahead`); each finished shard is recorded, so that ``resume`` can finish an
    interrupted run (see :mod:`.resume`).
    """
    t0 = time.perf_counter()
    o = MergeOptions.of(options, **changes)
    cfg, text, plan = plan_merge(config, o)
    check_device(o.device)
    threads = merge_threads(o)
    stage = StagingDir(out_dir, overwrite=o.overwrite or o.resume, resume=o.resume, protect=protected_inputs(plan, o.models_dir))
    sources = SourceCache(plan)
    try:
        try:
            done = start_run(stage.path, plan, o.resume, sources)
        except BaseException:
            abandon(stage)
            raise
        results, merged = list(done.values()), []
        todo = [s for s in plan.shards if s.index not in done]
        with kept_for_resume(stage), ReadAhead(sources, [k for s in todo for k in shard_keys(s)]) as reads:
            with progress_bar(plan, o.progress) as bar:
                bar.update(sum(r.bytes_written for r in results))
                first = 0
                for shard in todo:  # one read-ahead for all: it reads the next shard's sources while this one ends
                    r = run_shard(
                        plan, shard, stage.path, sources=sources, device=o.device, on_tensor=bar.update, threads=threads,
                        reads=reads, first=first,
                    )
                    first += len(shard.tensors)
                    write_done_record(stage.path, r)
                    merged.append(r)
            results += merged
            write_metadata(stage.path, cfg, text, plan, results, seconds=time.perf_counter() - t0)
            clear_run_state(stage.path, plan)
            out = stage.commit()
    finally:
        sources.close()
    where = f"in this process: {threads} merge thread(s) on {o.device}, {READ_THREADS} reader threads"
    return MergeResult(
        out, plan, sorted(results, key=lambda r: r.index), time.perf_counter() - t0, peak_rss_bytes(), resumed=len(done),
        where=where, cpu=summed(r.cpu for r in merged), read_wait=sum(r.read_wait for r in merged),
    )


def merge_threads(options: MergeOptions) -> int:
    """Positions merged at once in this process: ``workers``, else one per CPU (each torch op runs
    single-threaded), or two on a GPU (one computing while the other's tensors move)."""
    return options.workers or ((os.cpu_count() or 1) if options.device == "cpu" else 2)


def wants_ray(options: MergeOptions) -> bool:
    """Whether ``mergeserve merge`` runs on Ray: when given an ``address`` ("local": a Ray started
    on this machine), or for the math on several GPUs (``device="cuda"``, one actor per GPU).
    Otherwise one process is the fastest way: no cluster to start, no actor importing torch."""
    if options.address is not None:
        return True
    if options.device == "cuda":
        import torch

        return torch.cuda.device_count() > 1
    return False


def merge_together(
    planned: Sequence[tuple[MergeConfig, str, MergePlan, str | Path]], options: MergeOptions
) -> tuple[list[MergeResult], int]:
    """Merge planned recipes of one output layout together in this process, each source tensor
    read once per position for all of them (see :class:`~mergeserve.merge.multi.Batch`).

    ``planned`` holds (config, recipe text, plan, output directory) each; every output appears
    atomically, and none is left behind on failure. Returns each output's result and the source
    bytes read (the plans one by one read the sum of their ``bytes_read``).
    """
    from mergeserve.merge.executor import sources_for
    from mergeserve.merge.multi import Batch, run_shard_many

    t0 = time.perf_counter()
    o = options
    check_device(o.device)
    threads = merge_threads(o)
    batch = Batch.of([plan for _, _, plan, _ in planned])
    read = 0

    def count(n: int) -> None:
        nonlocal read
        read += n

    stages: list[StagingDir] = []
    try:
        for _, _, plan, out_dir in planned:
            stages.append(StagingDir(out_dir, protect=protected_inputs(plan, o.models_dir)))
        shards: list[list[ShardResult]] = [[] for _ in planned]
        with sources_for(batch, None) as sources, progress_bar(batch.plans[0], o.progress) as bar:
            bar.total *= len(planned)
            for k, layout in enumerate(batch.shards):
                got = run_shard_many(
                    batch, k, [s.path for s in stages], sources=sources, device=o.device, threads=threads,
                    on_position=count, direct=not o.read_back,
                )
                for acc, r in zip(shards, got):
                    acc.append(r)
                bar.update(layout.bytes_written * len(planned))
        for (cfg, text, plan, _), stage, done in zip(planned, stages, shards):
            write_metadata(stage.path, cfg, text, plan, done, seconds=time.perf_counter() - t0)
        outs = [stage.commit() for stage in stages]
    except BaseException:
        for stage in stages:
            stage.discard()
        raise
    seconds = time.perf_counter() - t0
    return [MergeResult(out, p, done, seconds, peak_rss_bytes()) for out, (_, _, p, _), done in zip(outs, planned, shards)], read


def protected_inputs(plan: MergePlan, models_dir: str | Path | None) -> list[Path]:
    """What an output must stay clear of (see :class:`StagingDir`): each input model's folder (a
    snapshot's whole Hugging Face cache repository) and ``--models-dir``."""
    return [model_bound(m.path) for m in plan.models] + ([Path(models_dir)] if models_dir else [])


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any work."""
    if device == "cpu":
        return
    import torch

    from mergeserve.errors import UnsupportedError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device}: no CUDA device is available on this machine")
    if not device.startswith(("cuda", "cpu")):
        raise ConfigError(f"--device: unknown device {device!r} (use cpu or cuda)")
