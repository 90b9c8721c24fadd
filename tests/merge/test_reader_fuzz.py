"""The safetensors header check against the safetensors library itself, on generated headers.

Each example is a small file: a valid header (0-4 tensors laid out contiguously) with mutations
of the kinds hostile files use: tensors laid out again with gaps and overlaps, junk tokens
(``-0``, ``NaN``, ``1e999``, lone surrogates, floats, booleans, strings, huge integers) in every
place a header has, duplicate keys, unknown or deep fields, odd ``__metadata__``, huge
dimensions, missing fields, bytes missing or left over, a wrong length prefix. Then:

- ``read_header`` returns tensors or raises ``InputError``; any other exception fails;
- whatever it accepts, ``safe_open`` accepts too, with the same names, dtypes, shapes and bytes;
- whatever ``safe_open`` accepts and it refuses, it refuses for one of its documented extra
  rules (a key given twice, a dtype this project cannot merge, nesting deeper than 64, a
  dimension beyond torch's int64 in an empty tensor).

Generated files hold at most ``MAX_DATA`` bytes of tensor data whatever their headers claim, and
nothing allocates from a generated shape, so memory stays small.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeserve.errors import InputError
from mergeserve.merge.reader import ST_DTYPES, read_header

safetensors = pytest.importorskip("safetensors")

LIB_DTYPES = {  # the library's dtypes and their sizes in bits (F4/F6 are sub-byte)
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
STRICTER = ("duplicate key", "unsupported dtype", "nested deeper", "int64 limit")
MAX_DATA = 4096  # bytes of tensor data in a generated file
TMP = Path(tempfile.mkdtemp(prefix="mergeserve-fuzz-"))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Raw(str):
    """JSON text written as is (NaN, -0, a lone surrogate escape, deep nesting)."""


class Pairs(list):
    """A JSON object as a list of [key, value]: keys may repeat."""

    def get(self, key):
        return next((kv for kv in self if kv[0] == key), None)


def encode(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Pairs):
        return "{" + ",".join(encode(k) + ":" + encode(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(encode(x) for x in v) + "]"
    return json.dumps(v)


# JSON that Python's parser reads and serde_json refuses (or reads as a float), then other junk.
JUNK = st.sampled_from([Raw("-0"), Raw("NaN"), Raw("Infinity"), Raw("1e999"), Raw('"\\ud800"'), Raw("2.0"), Raw("8e0")]) | st.sampled_from(
    [-1, 2**64, 2**64 - 1, 2**63, "8", True, False, None, [], [1], Pairs(), 3.5]
)
# Shapes whose element count overflows u64 on the way (refused even when a later 0 makes it 0), or
# that hold a dimension torch cannot (beyond int64) in an empty tensor.
HUGE = [[2**32, 2**32, 0], [2**62, 4, 0], [0, 2**32, 2**32], [0, 2**63], [2**63 - 1, 2, 0], [2**64 - 1, 0], [2**31, 2**31]]
LEAF = st.one_of(st.integers(-5, 2**65), st.booleans(), st.none(), st.text(max_size=4), st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def layouts(draw) -> tuple[Pairs, int]:
    """A valid header (as Pairs of tensor entries) and its data length."""
    names = draw(st.lists(st.text("abc.\u00e9", min_size=1, max_size=3), min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=4, unique=True))
    header, offset = Pairs(), 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ST_DTYPES)) | st.sampled_from(sorted(LIB_DTYPES)))
        shape = draw(st.lists(st.sampled_from([1, 2, 3, 4, 0]), max_size=3))
        n = LIB_DTYPES[dtype]
        for d in shape:
            n *= d
        n //= 8
        header.append([name, Pairs([["dtype", dtype], ["shape", shape], ["data_offsets", [offset, offset + n]]])])
        offset += n
    return header, offset


def _entries(header: Pairs) -> list[Pairs]:
    return [v for k, v in header if k != "__metadata__" and isinstance(v, Pairs)]


def relayout(draw, header: Pairs, data_len: int) -> int:
    """Offsets laid out again in another order, with gaps and overlaps; returns the data length."""
    end = 0
    for e in draw(st.permutations(_entries(header))):
        kv = e.get("data_offsets")
        if kv and all(type(v) is int for v in kv[1]) and 0 <= kv[1][1] - kv[1][0] <= MAX_DATA:
            start = max(0, end + draw(st.integers(-4, 4)))
            kv[1] = [start, start + kv[1][1] - kv[1][0]]
            end = kv[1][1]
    return end + draw(st.sampled_from([0, 0, 0, -1, 1]))


def junk(draw, header: Pairs, data_len: int) -> int:
    """One junk token in one place: a shape or offset value, a dtype, an unknown field, a
    metadata value, a tensor name, or a whole tensor entry."""
    entries = _entries(header)
    where = draw(st.sampled_from(["value", "value", "longer", "dtype", "field", "field", "metadata", "metadata", "name", "entry"]))
    token = draw(JUNK)
    if where == "metadata":
        header.insert(0, ["__metadata__", draw(st.sampled_from([Pairs([["k", token]]), Pairs([["k", token]]), token, Pairs([["k", "v"]])]))])
    elif where == "name" and header:
        header[draw(st.integers(0, len(header) - 1))][0] = Raw('"a\\udc00"')
    elif where == "entry" and header:
        header[draw(st.integers(0, len(header) - 1))][1] = token
    elif entries:
        e = draw(st.sampled_from(entries))
        kv = e.get(draw(st.sampled_from(["shape", "data_offsets"])))
        if where == "field":
            deep = st.integers(1, 140).map(lambda d: Raw("[" * d + "]" * d))
            e.append(["x", draw(st.sampled_from([token, token, 0]) | LEAF | deep)])
        elif where == "dtype" and e.get("dtype"):
            e.get("dtype")[1] = draw(st.sampled_from([token, "f32", "F33", "", ["F32"], "F16 "]))
        elif where == "longer" and kv and isinstance(kv[1], list):
            kv[1] = [*kv[1], 1]  # a shape keeps its size; offsets are three
        elif kv and isinstance(kv[1], list) and kv[1]:
            vals = list(kv[1])
            i = draw(st.integers(0, len(vals) - 1))
            # a boolean where 0 or 1 stood keeps the byte count: only its type is wrong
            vals[i] = bool(vals[i]) if draw(st.booleans()) and vals[i] in (0, 1) else token
            kv[1] = vals
    return data_len


def tile(header: Pairs) -> int:
    """Lay the tensors out contiguously in their order, sized by dtype and shape; returns the end."""
    end = 0
    for e in _entries(header):
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not (dtype and shape and offsets and dtype[1] in LIB_DTYPES and all(type(d) is int for d in shape)):
            continue
        n = LIB_DTYPES[dtype[1]]
        for d in shape:
            n *= d
        offsets[1] = [end, end + n // 8]
        end += n // 8
    return end


def other(draw, header: Pairs, data_len: int) -> int:
    """Duplicate keys, missing fields, huge dimensions, bytes missing or left over."""
    entries = _entries(header)
    kind = draw(st.sampled_from(["duplicate", "missing", "huge", "bytes"]))
    if kind == "duplicate" and header:
        k, v = draw(st.sampled_from(header))
        header.append([k, draw(st.sampled_from([v, Pairs([["dtype", "U8"], ["shape", [0]], ["data_offsets", [0, 0]]])]))])
    elif kind == "missing" and (nonempty := [e for e in entries if e]):
        e = draw(st.sampled_from(nonempty))
        del e[draw(st.integers(0, len(e) - 1))]
    elif kind == "huge" and entries:
        e = draw(st.sampled_from(entries))
        shape = draw(st.sampled_from(HUGE) | st.lists(st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1]), min_size=1, max_size=3))
        if e.get("shape"):
            e.get("shape")[1] = shape
            data_len = tile(header)  # offsets that fit: only the overflow is wrong
    else:
        data_len += draw(st.integers(-4, 4))
    return data_len


@st.composite
def files(draw, mutations=(relayout, junk, other), most=3) -> bytes:
    header, data_len = draw(layouts())
    for mutate in draw(st.lists(st.sampled_from(mutations), min_size=1, max_size=most)):
        data_len = mutate(draw, header, data_len)
    text = encode(header).encode() + b" " * draw(st.integers(0, 7))
    prefix = len(text) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, -8]))
    data_len = max(0, min(data_len, MAX_DATA))  # headers may claim more: files stay small
    return struct.pack("<Q", max(0, prefix)) + text + (bytes(range(1, 256)) * (data_len // 255 + 1))[:data_len]


def library_view(path: Path) -> dict | None:
    """{name: (dtype, shape)} as safe_open reads the file, or None if it refuses it."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception:  # noqa: BLE001 - the library's refusal, of whatever type
        return None


def check_against_library(blob: bytes) -> None:
    path = TMP / "x.safetensors"
    path.write_bytes(blob)
    lib = library_view(path)
    try:
        ours = read_header(path)
    except InputError as e:
        if lib is not None:
            assert any(s in str(e) for s in STRICTER), f"refused what safetensors accepts: {e}\n{blob[:400]!r}"
        return
    assert lib is not None, f"accepted what safetensors refuses: {blob[:400]!r}"
    assert {k: (v.dtype, list(v.shape)) for k, v in ours.items()} == lib
    with safetensors.safe_open(str(path), "pt") as f:  # accepted: the file is small, so are its tensors
        for k, info in ours.items():
            want = f.get_tensor(k).reshape(-1).view(torch.uint8)
            assert blob[info.start : info.end] == bytes(want.tolist()), k


@FUZZ
@given(files(mutations=(relayout,), most=1))
def test_layouts_with_gaps_and_overlaps(blob):
    check_against_library(blob)


@FUZZ
@given(files(mutations=(junk,), most=1))
def test_one_junk_token(blob):
    check_against_library(blob)


@FUZZ
@given(files())
def test_mixed_mutations(blob):
    check_against_library(blob)


def _blob(header: str, data_len: int = 8) -> bytes:
    text = header.encode()
    return struct.pack("<Q", len(text)) + text + bytes(range(1, data_len + 1))


A = '"a":{"dtype":"F32","shape":[2],"data_offsets":[%s,8]%s}'
B = '"b":{"dtype":"U8","shape":[%s,1],"data_offsets":[8,8]}'
TOKENS = ["-0", "NaN", "Infinity", "-Infinity", "1e999", '"\\ud800"', "0.0", "0e0", "false", '"0"', "[0]", "00", "0"]
TRICKY = {
    **{f"field {t}": "{%s,%s}" % (A % ("0", ',"x":' + t), B % "0") for t in TOKENS},
    **{f"metadata {t}": '{"__metadata__":{"k":%s},%s,%s}' % (t, A % ("0", ""), B % "0") for t in TOKENS},
    **{f"offset {t}": "{%s,%s}" % (A % (t, ""), B % "0") for t in TOKENS},
    **{f"dimension {t}": "{%s,%s}" % (A % ("0", ""), B % t) for t in TOKENS},
    **{f"shape {h}": "{%s,%s}" % (A % ("0", ""), B.replace("[%s,1]", json.dumps(h))) for h in HUGE},
    "name with a lone surrogate": "{%s,%s}" % (A.replace('"a"', '"a\\udc00"') % ("0", ""), B % "0"),
    "three offsets": "{%s}" % A.replace("8]", "8,8]") % ("0", ""),
    "overlap": '{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
    "bytes after the last tensor": '{"a":{"dtype":"U8","shape":[7],"data_offsets":[0,7]}}',
    "gap": '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}',
}
DUPLICATES = {
    "tensor, same entry": "{%s,%s}" % (A % ("0", ""), A % ("0", "")),
    "tensor, last entry valid": '{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},%s}' % (A % ("0", "")),
    "metadata key": '{"__metadata__":{"k":"1","k":"2"},%s}' % (A % ("0", "")),
    "field": '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
}


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_known_tricky_headers(case):
    """Each check, on the case that needs it, as one example: the random tests may miss some."""
    check_against_library(_blob(TRICKY[case]))


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_keys_are_refused(case):
    """The library keeps the last of two equal keys; a checkpoint that says two things is refused."""
    path = TMP / "dup.safetensors"
    path.write_bytes(_blob(DUPLICATES[case]))
    with pytest.raises(InputError, match="duplicate key"):
        read_header(path)


@pytest.mark.parametrize("depth", [65, 200_000])
def test_deep_json_is_refused_before_parsing(depth):
    path = TMP / "deep.safetensors"
    text = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(InputError, match="nested deeper than 64"):
        read_header(path)
