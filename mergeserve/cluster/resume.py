"""State of an interrupted run, kept in the staging directory, and its verification on --resume.

``.mergeserve-run.json`` records the plan's fingerprint (recipe + shard layout) and each input's
fingerprint (file names, sizes, mtimes, header hashes). A finished shard has a record
``.<shard>.done.json`` (written by the actor after the shard's atomic rename) with each tensor's
sha256. ``--resume`` refuses a changed recipe or changed inputs, re-hashes every finished shard
against its record, and returns the shards that need no redoing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergeserve.errors import ResumeError
from mergeserve.merge.execute import ShardResult, TensorRecord
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.reader import read_header

STATE = ".mergeserve-run.json"


def write_run_state(stage: Path, plan: MergePlan, inputs: dict[str, str]) -> None:
    (stage / STATE).write_text(json.dumps({"plan": plan.fingerprint, "inputs": inputs}, indent=2))


def _verify(path: Path, rec: ShardResult) -> bool:
    try:
        header = read_header(path)
    except Exception:  # noqa: BLE001 - any unreadable shard is simply redone
        return False
    with open(path, "rb") as f:
        for t in rec.tensors:
            info = header.get(t.name)
            if info is None or list(info.shape) != list(t.shape):
                return False
            f.seek(info.start)
            h = hashlib.sha256()
            left = info.nbytes
            while left:
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    return False
                h.update(chunk)
                left -= len(chunk)
            if h.hexdigest() != t.sha256:
                return False
    return True


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
        raw = json.loads(path.read_bytes().decode("utf-8"))
        raw["tensors"] = tuple(TensorRecord(t["name"], tuple(t["shape"]), t["dtype"], t["sha256"]) for t in raw["tensors"])
        return ShardResult(**raw)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None


def load_done_shards(stage: Path, plan: MergePlan, inputs: dict[str, str]) -> dict[int, ShardResult]:
    """Verified finished shards of an interrupted run; raises ResumeError if it is another run."""
    state_file = stage / STATE
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
        rec_file = stage / f".{shard.filename}.done.json"
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
