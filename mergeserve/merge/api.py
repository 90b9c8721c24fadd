"""The Python API behind ``mergeserve merge`` and ``mergeserve validate``.

Example::

    from mergeserve.merge.api import merge, validate
    validate("configs/tiny/marcoro14-slerp.yaml")           # raises ConfigError / InputError
    result = merge("configs/tiny/marcoro14-slerp.yaml", "out/merged", out_shard_size="1B")
    print(result.summary())

Everything the recipe and the inputs can get wrong is checked (config schema, methods and
parameters, layer ranges, model files' headers, shapes, architectures, tokenizer) before the
first tensor is merged; the checkpoint then appears atomically at ``out_dir``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeserve.errors import ConfigError
from mergeserve.merge.config import MergeConfig, load_config, parse_config
from mergeserve.merge.execute import ShardResult, SourceCache, peak_rss_bytes, run_shard
from mergeserve.merge.outputs import check_tokenizer, write_metadata
from mergeserve.merge.plan import DEFAULT_SHARD_SIZE, MergePlan, build_plan
from mergeserve.merge.untrusted import model_bound
from mergeserve.merge.writer import StagingDir


def parse_size(value: str | int | None) -> int:
    """'5B', '500M', '1.5G', '2GiB' or an int -> bytes (mergekit's K/M/B convention, B = 1e9)."""
    if value is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbBtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ConfigError(f"--out-shard-size: cannot parse {value!r} (e.g. 5B, 500M, 2000000000)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}[m[2].lower()]
    if m[3] and m[3].lower() == "ib":
        mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "b": 2**30, "t": 2**40}[m[2].lower()]
    size = int(float(m[1]) * mult)
    if size <= 0:
        raise ConfigError(f"--out-shard-size: must be positive, got {value!r}")
    return size


def _as_config(config: str | Path | MergeConfig | dict) -> tuple[MergeConfig, str]:
    if isinstance(config, MergeConfig):
        return config, config.to_yaml()
    if isinstance(config, dict):
        c = parse_config(config)
        return c, c.to_yaml()
    return load_config(config)


def plan_merge(config: str | Path | MergeConfig | dict, **kwargs: Any) -> tuple[MergeConfig, str, MergePlan]:
    """Validate the recipe against its inputs and return (config, recipe text, plan)."""
    cfg, text = _as_config(config)
    size = kwargs.pop("out_shard_size", None)
    plan = build_plan(cfg, shard_size=parse_size(size), **kwargs)
    check_tokenizer(cfg, plan)
    return cfg, text, plan


def validate(config: str | Path | MergeConfig | dict, **kwargs: Any) -> MergePlan:
    """Run every check ``merge`` runs before its first tensor; returns the plan."""
    return plan_merge(config, **kwargs)[2]


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

    @property
    def gb_per_s(self) -> float:
        return (self.plan.bytes_read + self.plan.bytes_written) / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        lines = [
            f"merged {self.plan.num_tensors} tensors ({self.plan.method}, {self.plan.num_layers} layers) "
            f"into {self.out_dir} in {self.seconds:.2f} s",
            f"  read {self.plan.bytes_read / 1e9:.2f} GB, wrote {self.plan.bytes_written / 1e9:.2f} GB "
            f"in {len(self.shards)} shard(s): {self.gb_per_s:.2f} GB/s",
            f"  peak memory: driver {self.peak_rss / 2**30:.2f} GiB",
        ]
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


def _progress(plan: MergePlan, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=plan.bytes_written, unit="B", unit_scale=True, desc="merging", disable=not enabled,
        dynamic_ncols=True, leave=False,
    )


def merge(
    config: str | Path | MergeConfig | dict,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    out_shard_size: str | int | None = None,
    out_dtype: str | None = None,
    overwrite: bool = False,
    models_dir: str | Path | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> MergeResult:
    """Merge in this process (no Ray). See :func:`mergeserve.cluster.driver.merge_distributed`."""
    t0 = time.perf_counter()
    cfg, text, plan = plan_merge(
        config, out_shard_size=out_shard_size, out_dtype=out_dtype, models_dir=models_dir,
        allow_pickle=allow_pickle, seed=seed,
    )
    _check_device(device)
    threads = (os.cpu_count() or 1) if device == "cpu" else 2
    stage = StagingDir(out_dir, overwrite=overwrite, protect=protected_inputs(plan, models_dir))
    sources = SourceCache(plan.models, allow_pickle=allow_pickle)
    results: list[ShardResult] = []
    try:
        with _progress(plan, progress) as bar:
            for shard in plan.shards:
                results.append(
                    run_shard(plan, shard, stage.path, sources=sources, device=device, on_tensor=bar.update, threads=threads)
                )
        write_metadata(stage.path, cfg, text, plan, results, seconds=time.perf_counter() - t0)
        out = stage.commit()
    except BaseException:
        stage.discard()
        raise
    finally:
        sources.close()
    return MergeResult(out, plan, results, time.perf_counter() - t0, peak_rss_bytes())


def protected_inputs(plan: MergePlan, models_dir: str | Path | None) -> list[Path]:
    """What an output must stay clear of (see :class:`StagingDir`): each input model's folder (a
    snapshot's whole Hugging Face cache repository) and ``--models-dir``."""
    return [model_bound(m.path) for m in plan.models] + ([Path(models_dir)] if models_dir else [])


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    from mergeserve.errors import UnsupportedError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device}: no CUDA device is available on this machine")
    if not device.startswith(("cuda", "cpu")):
        raise ConfigError(f"--device: unknown device {device!r} (use cpu or cuda)")
