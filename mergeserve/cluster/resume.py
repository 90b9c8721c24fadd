"""State of an interrupted run, kept in the staging directory, and its verification on --resume.

``.mergeserve-run.json`` records the plan's fingerprint (recipe + shard layout) and each input's
fingerprint (file names, sizes, mtimes, header hashes). A finished shard has a record
``.<shard>.done.json`` (written by the driver after the shard's atomic rename) with each tensor's
sha256. ``--resume`` refuses a changed recipe or changed inputs, re-hashes every finished shard
against its record, and returns the shards that need no redoing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from mergeserve.errors import ResumeError
from mergeserve.merge.executor import ShardResult
from mergeserve.merge.outputs import verify_tensors
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.writer import tmp_path

RUN_STATE = ".mergeserve-run.json"


def done_record(stage: str | Path, filename: str) -> Path:
    """Where a finished shard's record (tensor names, shapes, sha256) is kept for --resume."""
    return Path(stage) / f".{filename}.done.json"


def write_run_state(stage: Path, plan: MergePlan, inputs: dict[str, str]) -> None:
    (stage / RUN_STATE).write_text(json.dumps({"plan": plan.fingerprint, "inputs": inputs}, indent=2))


def write_done_record(stage: str | Path, result: ShardResult) -> None:
    """Record a finished shard, atomically; written after the shard's own rename, so that a
    record on disk implies a complete shard."""
    rec = done_record(stage, result.filename)
    tmp = tmp_path(rec)
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, rec)


def clear_run_state(stage: Path, plan: MergePlan) -> None:
    """Remove the resume records: they are not part of the checkpoint."""
    for s in plan.shards:
        done_record(stage, s.filename).unlink(missing_ok=True)
    (stage / RUN_STATE).unlink(missing_ok=True)


def _verify(path: Path, rec: ShardResult) -> bool:
    return verify_tensors(path, [(t.name, t.shape, t.sha256) for t in rec.tensors])


def _read_state(path: Path) -> dict:
    """The run state, or ResumeError if it is not one this code wrote (truncated, edited, corrupt)."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if isinstance(state, dict) and isinstance(state.get("plan"), str) and isinstance(state.get("inputs"), dict):
            return state
    except (OSError, ValueError, RecursionError):
        pass
    raise ResumeError(f"--resume: the run state {path} is corrupt or unreadable; start afresh without --resume")


def _read_record(path: Path) -> ShardResult | None:
    """A finished shard's record, or None if it is corrupt (the shard is then merged again)."""
    try:
        return ShardResult.from_dict(json.loads(path.read_bytes().decode("utf-8")))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None


def load_done_shards(stage: Path, plan: MergePlan, inputs: dict[str, str]) -> dict[int, ShardResult]:
    """Verified finished shards of an interrupted run; raises ResumeError if it is another run."""
    state_file = stage / RUN_STATE
    if not state_file.exists():
        raise ResumeError(f"--resume: no interrupted run to resume at {stage}")
    state = _read_state(state_file)
    changed = [ref for ref, fp in inputs.items() if state["inputs"].get(ref) != fp]
    if changed:
        raise ResumeError(f"--resume: input model(s) changed since the first run: {', '.join(changed)}; start afresh without --resume")
    if state["plan"] != plan.fingerprint:
        raise ResumeError("--resume: the recipe or merge options differ from the interrupted run; start afresh without --resume")
    done: dict[int, ShardResult] = {}
    for shard in plan.shards:
        rec_file = done_record(stage, shard.filename)
        path = stage / shard.filename
        if not (rec_file.exists() and path.exists()):
            continue
        rec = _read_record(rec_file)
        if rec is not None and _verify(path, rec):
            done[shard.index] = rec
        else:
            path.unlink(missing_ok=True)
            rec_file.unlink(missing_ok=True)
    return done
