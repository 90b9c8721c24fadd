"""State of an interrupted run, kept in its staging directory, and what ``--resume`` reuses of it.

``.mergeserve-run.json`` records the state's format and the plan's fingerprint (recipe, options
and shard layout). A finished shard has a record ``.<shard>.done.json``, written after the
shard's atomic rename: each tensor's digest, and the digest of the source tensors the shard read
(:func:`~mergeserve.merge.executor.sources_digest`, computed as they were read).

``--resume`` refuses another recipe or other options, and reuses a finished shard only if

- its file still matches its record (every tensor re-hashed), and
- its sources still hold the bytes it read: they are read again and re-hashed (at the disk's
  speed, through :class:`~mergeserve.merge.readahead.ReadAhead`). An input changed in any way,
  even keeping its size and mtime, makes the shards that read it be merged again; an input merely
  touched or copied does not.

A state left by a version that did not fingerprint its sources (sha256 records) cannot say what
its shards read: it is refused.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from mergeserve.errors import ConfigError, InputError, ResourceError, ResumeError
from mergeserve.merge.digest import DIGEST
from mergeserve.merge.executor import ShardResult, shard_keys, sources_digest
from mergeserve.merge.outputs import verify_tensors
from mergeserve.merge.plan import MergePlan, ShardTask
from mergeserve.merge.readahead import Key, ReadAhead
from mergeserve.merge.writer import StagingDir, tmp_path

RUN_STATE = ".mergeserve-run.json"
# 2: digests (DIGEST) of outputs and of the sources each shard read. 1 (no "format" key): sha256
# of outputs only, inputs fingerprinted by size, mtime and header.
STATE_FORMAT = 2


def done_record(stage: str | Path, filename: str) -> Path:
    """Where a finished shard's record (tensor digests, sources digest) is kept for --resume."""
    return Path(stage) / f".{filename}.done.json"


def write_run_state(stage: Path, plan: MergePlan) -> None:
    (stage / RUN_STATE).write_text(json.dumps({"format": STATE_FORMAT, "digest": DIGEST, "plan": plan.fingerprint}, indent=2))


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


def _output_intact(path: Path, rec: ShardResult) -> bool:
    """Whether the shard file holds exactly the tensors its record lists (re-hashed)."""
    return verify_tensors(path, [(t.name, t.shape, t.digest) for t in rec.tensors])


def _read_state(path: Path) -> dict:
    """The run state, or ResumeError if it is not one this code wrote (truncated, edited, corrupt, older)."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        state = None
    if not (isinstance(state, dict) and isinstance(state.get("plan"), str)):
        raise ResumeError(f"--resume: the run state {path} is corrupt or unreadable; start afresh without --resume")
    if state.get("format") != STATE_FORMAT or state.get("digest") != DIGEST:
        raise ResumeError(
            f"--resume: {path.parent} was left by an earlier mergeserve, whose records do not say which input bytes "
            "each shard read; start afresh without --resume"
        )
    return state


def _read_record(path: Path) -> ShardResult | None:
    """A finished shard's record, or None if it is corrupt (the shard is then merged again)."""
    try:
        rec = ShardResult.from_dict(json.loads(path.read_bytes().decode("utf-8")))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    return rec if rec.sources_digest else None


def read_sources(sources, shards: list[ShardTask]) -> dict[Key, str]:
    """The digest of every source tensor of ``shards``, read again (at the disk's speed)."""
    keys = [k for s in shards for k in shard_keys(s)]
    with ReadAhead(sources, keys) as reads:
        for i, ks in enumerate(keys):
            for k in ks:
                reads.get(i, k)
            reads.finish(i)
        return dict(reads.digests)


def start_run(stage: Path, plan: MergePlan, resume: bool, sources=None) -> dict[int, ShardResult]:
    """The shards an interrupted run finished that are reused (``resume``; see
    :func:`load_done_shards`, reading through ``sources`` or a SourceCache opened for it), else
    none, the run state of a fresh run being written."""
    if not resume:
        write_run_state(stage, plan)
        return {}
    if sources is not None:
        return load_done_shards(stage, plan, sources)
    from mergeserve.merge.execute import SourceCache

    own = SourceCache(plan)
    try:
        return load_done_shards(stage, plan, own)
    finally:
        own.close()


def load_done_shards(stage: Path, plan: MergePlan, sources) -> dict[int, ShardResult]:
    """The finished shards of an interrupted run that can be reused as they are (see the module);
    the others' files are removed. ResumeError if there is no run, another run, or an older one.
    ``sources``: a SourceCache of ``plan``'s inputs."""
    state_file = stage / RUN_STATE
    if not state_file.exists():
        raise ResumeError(f"--resume: no interrupted run to resume at {stage}")
    state = _read_state(state_file)
    if state["plan"] != plan.fingerprint:
        raise ResumeError(
            "--resume: the recipe, the merge options or the inputs' tensors differ from the interrupted run; start afresh without --resume"
        )
    found: dict[int, ShardResult] = {}
    for shard in plan.shards:
        rec_file, path = done_record(stage, shard.filename), stage / shard.filename
        if rec_file.exists() and path.exists():
            rec = _read_record(rec_file)
            if rec is not None and _output_intact(path, rec):
                found[shard.index] = rec
                continue
        path.unlink(missing_ok=True)
        rec_file.unlink(missing_ok=True)
    digests = read_sources(sources, [plan.shards[i] for i in found])
    done: dict[int, ShardResult] = {}
    for i, rec in found.items():
        shard = plan.shards[i]
        mine = {k: digests[k] for t in shard.tensors for k in t.sources}
        if sources_digest(plan.models, mine) == rec.sources_digest:
            done[i] = rec
        else:  # an input changed since this shard was merged
            (stage / shard.filename).unlink(missing_ok=True)
            done_record(stage, shard.filename).unlink(missing_ok=True)
    return done


def abandon(stage: StagingDir) -> None:
    """A run that failed before its first tensor: nothing of it stays (an interrupted run being
    resumed stays as it was, for the next --resume)."""
    if stage.resuming:
        stage.release()
    else:
        stage.discard()


@contextmanager
def kept_for_resume(stage: StagingDir):
    """What a failed run leaves in its staging directory. Bad input and resource errors (disk
    full, out of memory) remove it: rerunning cannot finish it. Anything else (an interrupt, a
    lost cluster) keeps the finished shards and their records for ``--resume``."""
    try:
        yield
    except (InputError, ConfigError, ResourceError, ResumeError):
        stage.discard()
        raise
    except BaseException:
        if any(True for _ in stage.path.glob("*.safetensors")):
            print(f"mergeserve: partial results kept in {stage.path}; rerun with --resume to finish", file=sys.stderr)
            stage.release()
        else:
            stage.discard()
        raise
