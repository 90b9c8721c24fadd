"""Reading files we do not trust: model directories downloaded from anywhere.

A model directory is data written by someone else. Its index names files; its symlinks point
anywhere; any of its entries may be a FIFO or a device; its JSON may be nested 200,000 deep or
hold the same key twice. The helpers here are the only way :mod:`.reader` and :mod:`.outputs`
reach a model's files:

- :func:`resolve_inside` follows a relative name (and every symlink on its way) one component
  at a time and refuses, before touching it, any path that leaves the model's bound: the model
  directory, or in the Hugging Face cache layout (``models--org--name/snapshots/REV/file ->
  ../../blobs/HASH``) the repository's cache folder. A path outside is never opened nor stat-ed,
  and nothing about it is printed.
- :func:`open_regular` opens regular files only (never blocks on a FIFO, never opens a device).
- :func:`parse_json` parses with bounded size and nesting, refuses duplicate keys, and reads
  numbers as the safetensors library (serde_json) does.

No torch here: the recipe and config code use it too.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

from mergeserve.errors import InputError

# Deeper JSON is refused before parsing. A safetensors header nests 3 levels (header, tensor
# entry, shape); serde_json, which the safetensors library uses, stops at 128.
MAX_JSON_DEPTH = 64
# The kernel's own limit on symlinks followed while resolving one path (ELOOP).
MAX_SYMLINKS = 40

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_PAIR = re.compile(rb"\[\]|\{\}")
_TOO_DEEP = re.compile(rb"[\[{]{%d}" % (MAX_JSON_DEPTH + 1))
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def model_bound(directory: str | Path) -> Path:
    """The folder a model's files must resolve into: the directory itself, or for a snapshot in
    the Hugging Face cache, the repository's cache folder (its files link into ``../../blobs``)."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _inside(p: Path, bound: Path) -> bool:
    return p == bound or bound in p.parents


def resolve_inside(directory: str | Path, name: str, what: str, bound: Path | None = None) -> Path | None:
    """The real path of ``directory/name`` if it is a regular file inside ``bound`` (default:
    :func:`model_bound` of ``directory``); None if it does not exist.

    Raises InputError (``what`` names the entry) for an absolute name, a path or symlink leading
    outside the bound, a symlink loop, or something other than a regular file. Components are
    resolved one by one, so a path is only looked at (``lstat``) while it is inside the bound or
    on the way down to it: the target of an escape is never stat-ed, opened or described.
    """
    bound = bound or model_bound(directory)
    outside = InputError(f"{what} points outside the model directory {bound}")
    if os.path.isabs(name) or "\0" in name:
        raise outside
    cur = Path(os.path.realpath(directory))  # the user chose this directory: it may be a link
    todo = name.split("/")[::-1]
    links = 0
    st = None
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            cur, st = cur.parent, None  # cur has no symlinks, so its parent is its real parent
            continue
        nxt = cur / part
        if not (_inside(nxt, bound) or nxt in bound.parents):
            raise outside
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise InputError(f"{what}: cannot read: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise InputError(f"{what}: too many levels of symbolic links")
            target = os.readlink(nxt)
            if os.path.isabs(target):
                cur = Path("/")
            todo.extend(target.split("/")[::-1])
            st = None
            continue
        cur = nxt
    if not _inside(cur, bound):
        raise outside
    if st is None or not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} is not a regular file")
    return cur


def model_file(directory: str | Path, name: str) -> Path | None:
    """``directory/name`` resolved inside the model (see :func:`resolve_inside`), or None."""
    return resolve_inside(directory, name, str(Path(directory) / name))


def open_regular(path: str | Path, what: str | None = None) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; InputError otherwise (never blocks: a
    FIFO would wait for a writer, a device might never end)."""
    label = what or str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{label} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"{label}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat above
        os.close(fd)
        raise InputError(f"{label} is not a regular file")
    return os.fdopen(fd, "rb")


def read_capped(path: str | Path, limit: int, what: str | None = None) -> bytes:
    """The bytes of regular file ``path``, refusing files over ``limit`` bytes."""
    label = what or str(path)
    with open_regular(path, label) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise InputError(f"{label}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise InputError(f"{label}: larger than the {limit:,}-byte limit for this file")
    return data


class _Refused(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"number {text[:40]} out of range")
    return v


def _int(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, so an offset or dimension of -0 is refused there.
    return -0.0 if text == "-0" else int(text)


def check_depth(raw: bytes, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before any parser recurses into it.

    Strings are blanked, then innermost ``[]``/``{}`` pairs are removed once per level; brackets
    left after ``limit`` rounds mean deeper nesting (or unbalanced brackets, invalid anyway).
    Each round is one C-speed pass, and a run of ``limit + 1`` openers stops at once.
    """
    s = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    for _ in range(limit + 1):
        if not s:
            return
        if _TOO_DEEP.search(s):
            break
        t = _PAIR.sub(b"", s)
        if len(t) == len(s):
            break
        s = t
    raise InputError(f"{what}: JSON nested deeper than {limit} levels (or unbalanced brackets)")


def _check_strings(value: Any, what: str) -> None:
    """Refuse lone UTF-16 surrogates (``"\\ud800"``): valid to Python's parser, not to serde_json."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{what}: string holds an unpaired UTF-16 surrogate") from None


def parse_json(raw: bytes, what: str, *, strict: bool = True) -> Any:
    """Parse UTF-8 JSON ``raw``; InputError naming ``what`` for anything invalid.

    Always: strict UTF-8 (``json.loads`` would guess UTF-16 from bytes), bounded nesting.
    ``strict`` (safetensors headers, indexes): duplicate keys, NaN/Infinity, out-of-range
    numbers and lone surrogates are refused, and ``-0`` is a float, as in serde_json.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not valid UTF-8 (byte {e.start})") from None
    check_depth(raw, what)
    hooks = dict(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float, parse_int=_int) if strict else {}
    try:
        value = json.loads(text, **hooks)
    except _Refused as e:
        raise InputError(f"{what}: {e}") from None
    except RecursionError:
        raise InputError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:
        raise InputError(f"{what}: not valid JSON ({e})") from None
    if strict:
        _check_strings(value, what)
    return value
