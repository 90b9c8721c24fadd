"""Every bad input from the issue: one line naming the field, file or tensor, exit code 2, nothing written.

Most cases call ``mergeserve.cli.main`` in-process (the same code path as the console command,
which returns the exit code); one case runs the real console command to check the process exit
status too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeserve.cli import main
from mergeserve.synthetic import Shape, make_random_model

SLERP = {
    "merge_method": "slerp", "base_model": "a", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}],
    "parameters": {"t": 0.5},
}


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    """Good models a/b plus broken variants, all under one models dir."""
    root = tmp_path_factory.mktemp("bad-input-models")
    for k in ("a", "b"):
        shutil.copytree(random_models[k], root / k)
    make_random_model(root / "wide", Shape("mistral", 256, 4, 640, 4, 2, 4096), seed=9)  # other intermediate size
    shutil.copytree(root / "b", root / "llama")
    cfg = json.loads((root / "llama" / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (root / "llama" / "config.json").write_text(json.dumps(cfg))

    def edit(name, fn):
        shutil.copytree(root / "b", root / name)
        f = root / name / "model.safetensors"
        tensors = load_file(f)
        fn(tensors)
        save_file(tensors, f)
        idx = root / name / "model.safetensors.index.json"
        wm = {k: "model.safetensors" for k in tensors}
        idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    edit("missing", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    edit("nan", lambda t: t["model.layers.1.self_attn.v_proj.weight"].view(-1).__setitem__(7, float("nan")))
    shutil.copytree(root / "b", root / "truncated")
    f = root / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.copytree(root / "b", root / "corrupt")
    f = root / "corrupt" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"{ this is not json at all !!!!!!"
    f.write_bytes(bytes(raw))
    shutil.copytree(root / "b", root / "pickled")
    for p in (root / "pickled").glob("model*"):
        p.unlink()
    torch.save(load_file(random_models["b"] / "model.safetensors"), root / "pickled" / "pytorch_model.bin")
    shutil.copytree(root / "pickled", root / "pickled-junk")
    torch.save({"step": 3, "note": "not weights"}, root / "pickled-junk" / "pytorch_model.bin")
    for name, fn in HEADER_EDITS.items():
        shutil.copytree(root / "b", root / name)
        _edit_header(root / name / "model.safetensors", fn)
    for name, fn in CONFIG_EDITS.items():
        shutil.copytree(root / "b", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps(fn(cfg)))
    shutil.copytree(root / "b", root / "index-list")
    (root / "index-list" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    for name, target in (("fifo-shard", "model.safetensors"), ("fifo-config", "config.json")):
        shutil.copytree(root / "b", root / name)
        (root / name / target).unlink()
        os.mkfifo(root / name / target)  # opening it for reading would wait for a writer forever
    return root


def _edit_header(f, fn) -> None:
    """Rewrite a safetensors file's header with ``fn(header dict) -> dict or raw bytes``, same data."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    new = fn(json.loads(raw[8 : 8 + n]))
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def _first(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _set(field, value):
    def fn(h):
        h[_first(h)][field] = value(h[_first(h)][field]) if callable(value) else value
        return h
    return fn


def _overlap(h):  # the second tensor (by offset) starts 2 bytes early; the data still ends at the end
    names = sorted((v["data_offsets"], k) for k, v in h.items() if k != "__metadata__")
    (a, b), k = names[1]
    h[k]["data_offsets"] = [a - 2, b - 2]
    (a2, b2), k2 = names[2]
    h[k2]["data_offsets"] = [a2 - 2, b2]
    h[k2]["shape"] = [(b2 - a2 + 2) // 2]  # bf16: one more element, so the byte count fits
    return h


def _duplicate_key(h):
    text = json.dumps(h)
    k = _first(h)
    return text[:-1].encode() + b", " + json.dumps(k).encode() + b": " + json.dumps(h[k]).encode() + b"}"


HEADER_EDITS = {
    "offsets-as-strings": _set("data_offsets", lambda o: [str(x) for x in o]),
    "float-offsets": _set("data_offsets", lambda o: [float(x) for x in o]),
    "dtype-as-list": _set("dtype", lambda d: [d]),
    "negative-shape": _set("shape", lambda s: [-x for x in s]),
    "overflowing-shape": _set("shape", lambda s: [2**40, 2**40, 2**40, 0]),
    "overlapping-offsets": _overlap,
    "duplicate-key": _duplicate_key,
    "deep-json": lambda h: b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
}
CONFIG_EDITS = {
    "config-list": lambda c: [c],
    "layers-four": lambda c: {**c, "num_hidden_layers": "four"},
    "layers-six": lambda c: {**c, "num_hidden_layers": 6},
    "layers-huge": lambda c: {**c, "num_hidden_layers": 10**8},
}


def _recipe(tmp_path, recipe: dict) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return str(p)


def _with(**changes) -> dict:
    r = json.loads(json.dumps(SLERP))
    for k, v in changes.items():
        r[k] = v
    return r


def _slerp_b(model_b: str) -> dict:
    r = _with()
    r["slices"][0]["sources"][1]["model"] = model_b
    return r


def _run(tmp_path, models, recipe, capsys, *extra):
    out = tmp_path / "out"
    code = main(["merge", _recipe(tmp_path, recipe), str(out), "--local", "-q", "--models-dir", str(models), *extra])
    err = capsys.readouterr().err.strip()
    return code, err, out


CASES = {
    "unknown method": (_with(merge_method="slurp"), ["merge_method", "slurp"]),
    "missing required parameter": (_with(parameters={}), ["parameters.t", "required"]),
    "empty gradient": (_with(parameters={"t": []}), ["parameters.t"]),
    "layer_range out of bounds": (
        _with(slices=[{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [2, 6]}]}]),
        ["slices[0].sources[1].layer_range", "out of bounds"],
    ),
    "ranges of different length": (
        _with(slices=[{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 3]}]}]),
        ["layer_range"],
    ),
    "shapes differ": (_slerp_b("wide"), ["mlp", "shapes differ"]),
    "missing tensor": (_slerp_b("missing"), ["model.layers.2.mlp.up_proj.weight", "missing"]),
    "differing architectures": (_slerp_b("llama"), ["architectures", "LlamaForCausalLM"]),
    "nan in input": (_slerp_b("nan"), ["model.layers.1.self_attn.v_proj.weight", "NaN"]),
    "truncated safetensors": (_slerp_b("truncated"), ["model.safetensors", "truncated"]),
    "corrupt safetensors": (_slerp_b("corrupt"), ["model.safetensors"]),
    "unreadable model path": (_slerp_b("does-not-exist"), ["does-not-exist"]),
    "pickle without opt-in": (_slerp_b("pickled"), ["pytorch_model.bin", "--allow-pickle"]),
    "pickle of non-tensors": (_slerp_b("pickled-junk"), ["pytorch_model.bin", "not a checkpoint of named tensors"], "--allow-pickle"),
    "offsets as strings": (_slerp_b("offsets-as-strings"), ["offsets-as-strings/model.safetensors", "data_offsets"]),
    "float offsets": (_slerp_b("float-offsets"), ["float-offsets/model.safetensors", "data_offsets"]),
    "dtype as a list": (_slerp_b("dtype-as-list"), ["dtype-as-list/model.safetensors", "dtype"]),
    "negative shape": (_slerp_b("negative-shape"), ["negative-shape/model.safetensors", "shape"]),
    "overflowing shape": (_slerp_b("overflowing-shape"), ["overflowing-shape/model.safetensors", "overflows"]),
    "overlapping offsets": (_slerp_b("overlapping-offsets"), ["overlapping-offsets/model.safetensors", "overlaps"]),
    "duplicate tensor key": (_slerp_b("duplicate-key"), ["duplicate-key/model.safetensors", "duplicate key"]),
    "JSON nested 200k deep": (_slerp_b("deep-json"), ["deep-json/model.safetensors", "nested deeper"]),
    "config.json a list": (_slerp_b("config-list"), ["config-list/config.json", "JSON object"]),
    "num_hidden_layers four": (_slerp_b("layers-four"), ["layers-four/config.json", "num_hidden_layers", "'four'"]),
    "num_hidden_layers 6 for 4": (_slerp_b("layers-six"), ["layers-six/config.json", "num_hidden_layers is 6", "4 layers"]),
    "num_hidden_layers 10**8": (_slerp_b("layers-huge"), ["layers-huge/config.json", "100000000", "4 layers"]),
    "weight_map a list": (_slerp_b("index-list"), ["index-list/model.safetensors.index.json", "weight_map"]),
    "FIFO as a shard": (_slerp_b("fifo-shard"), ["fifo-shard/model.safetensors", "not a regular file"]),
    "FIFO as config.json": (_slerp_b("fifo-config"), ["fifo-config/config.json", "not a regular file"]),
}


def _snapshot(root) -> dict:
    """(size, mtime) of every entry under ``root``, without opening any (FIFOs included)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.timeout(120)  # a FIFO opened for reading would block: fail, do not hang
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(case, models, tmp_path, capsys):
    recipe, needles, *extra = CASES[case]
    before = _snapshot(models)
    code, err, out = _run(tmp_path, models, recipe, capsys, *extra)
    assert code == 2, err
    assert err.startswith("mergeserve: error: ") and "\n" not in err, err
    for n in needles:
        assert n.lower() in err.lower(), (n, err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"], "a staging directory was left behind"
    assert _snapshot(models) == before, "an input changed"


def test_all_problems_are_reported_at_once(models, tmp_path, capsys):
    r = _with(merge_method="slerp", parameters={}, dtype="bfloat17")
    r["slices"][0]["sources"][1]["layer_range"] = [0, 9, 2]
    code, err, _ = _run(tmp_path, models, r, capsys)
    assert code == 2
    assert "dtype" in err and "layer_range" in err, err


def test_existing_output_is_refused_without_overwrite(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err, _ = _run(tmp_path, models, SLERP, capsys)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, err, _ = _run(tmp_path, models, SLERP, capsys, "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors.index.json").exists() and not (out / "keep.txt").exists()


def test_unreadable_recipe_path(tmp_path, capsys):
    code = main(["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out"), "--local"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml" in err and not (tmp_path / "out").exists()


def test_pickle_loads_with_opt_in(models, tmp_path, capsys):
    code, err, out = _run(tmp_path, models, _slerp_b("pickled"), capsys, "--allow-pickle")
    assert code == 0, err
    assert (out / "config.json").exists()


def test_console_command_exit_status(models, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "mergeserve.cli", "merge", _recipe(tmp_path, _with(merge_method="slurp")), str(tmp_path / "o"), "--local"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "slurp" in p.stderr


def test_missing_lora_adapter_is_refused_naming_it(models, tmp_path, capsys):
    r = _slerp_b("b+some/adapter")
    code, err, out = _run(tmp_path, models, r, capsys)
    assert code == 2 and "LoRA adapter" in err and "b+some/adapter" in err and not out.exists()
