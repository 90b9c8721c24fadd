"""How a merge runs: one frozen, typed options object (mergekit's ``MergeOptions`` is the model).

:class:`MergeOptions` holds everything besides the recipe and the output directory: how the plan
is made (``out_shard_size``, ``out_dtype``, ``models_dir``, ``allow_pickle``, ``seed``), where it
runs (``device``, ``address``, ``workers``; in this process unless given an address, see
:func:`~mergeserve.merge.api.wants_ray`), whether it finishes an interrupted run (``resume``) and
what the caller sees (``overwrite``, ``progress``). The CLI builds one from its flags; the Python
API takes one, or its fields as keywords. What the workers must honour travels inside the plan
(:attr:`~mergeserve.merge.plan.MergePlan.allow_pickle`), so that no worker reads the inputs
differently from the planner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from mergeserve.errors import ConfigError

DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes per output file, mergekit's default ("5B")
NO_SHARDING = 1 << 62  # a shard size no checkpoint reaches: the whole plan in one file
AUTO = "auto"  # out_shard_size: sized so that every worker has shards to write (distributed runs)


@dataclass(frozen=True)
class MergeOptions:
    """Everything about a merge run besides the recipe and the output directory."""

    device: str = "cpu"  # cpu or cuda[:N], for the tensor math
    out_shard_size: int | str | None = None  # bytes, "5B", "500M", "2GiB" or AUTO; None: 5 GB (local), AUTO (Ray)
    out_dtype: str | None = None  # overrides the recipe's out_dtype (bfloat16, float16, float32, fp8)
    models_dir: str | Path | None = None  # model ids resolve under this directory first
    allow_pickle: bool = False  # pickle .bin inputs may be loaded (weights only)
    seed: int = 0  # seed of random methods (dare, della)
    overwrite: bool = False  # replace an existing output directory
    progress: bool = True  # show a progress bar
    address: str | None = None  # Ray: 'local' (start one here), 'auto' or host:port (join); None: this process
    workers: int | None = None  # merge threads in this process, or Ray actors (default: one per CPU; on Ray one per GPU if any)
    resume: bool = False  # finish an interrupted run, verifying finished shards and the inputs they read (multi-stage: finished stages)
    read_back: bool = False  # the outputs are read again at once (multi-stage intermediates): written through the page cache, not O_DIRECT
    keep_intermediates: bool = False  # multi-stage recipes: keep each stage's checkpoint as OUT/stages/NAME

    @classmethod
    def of(cls, options: MergeOptions | None = None, **changes) -> MergeOptions:
        """``options`` (default: the defaults) with ``changes``; an unknown name is a TypeError."""
        return replace(options or cls(), **changes)


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


def auto_shard_size(total_bytes: int, shards: int) -> int:
    """A shard size giving about ``shards`` files for ``total_bytes`` of output (each file holds
    whole layers, so there may be fewer), at most DEFAULT_SHARD_SIZE."""
    return max(1, min(DEFAULT_SHARD_SIZE, total_bytes // max(1, shards)))
