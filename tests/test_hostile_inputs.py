"""Hostile model directories, recipes and outputs (issue 16), through ``mergeserve.cli.main``.

Each case asserts the exit code, exactly one ``mergeserve: error:`` line, that nothing was written
and that the inputs are intact. ``main`` is the console command's own code path (it returns the
exit code; an unexpected exception would fail the test with its traceback).

Path traversal: "the file outside was never opened" is checked with inotify (``IN_OPEN`` and
``IN_ACCESS`` on the directory holding the outside model). The kernel reports every open of the
directory or a file in it, by any process, whatever the filesystem's atime settings; each test
first opens the file itself and checks that the watch saw it, so a watch that cannot see opens
fails the test instead of passing it. (A stat is not an inotify event: that the resolver never
stats an outside path is shown by its design, see ``mergeserve/merge/untrusted.py``.)
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil

import pytest
import yaml

from mergeserve.cli import main
from mergeserve.merge.writer import StagingDir

IN_ACCESS, IN_OPEN = 0x1, 0x20


class OpenWatch:
    """Counts opens and reads of a directory and the files in it (inotify)."""

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN | IN_ACCESS) < 0:
            pytest.skip(f"inotify unavailable ({os.strerror(ctypes.get_errno())})")

    def events(self) -> int:
        n = 0
        while True:
            try:
                n += len(os.read(self.fd, 65536))
            except BlockingIOError:
                return n

    def close(self):
        os.close(self.fd)


def _snapshot(root) -> dict:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _recipe(tmp_path, a, b, name="recipe.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
    }))
    return str(p)


def _cli(capsys, *args) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, capsys.readouterr().err.splitlines()


def _one_error(code, lines, *needles, exit_code=2):
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith("mergeserve: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def inputs(random_models, tmp_path):
    """Private copies (these tests try to make the merge delete or read its inputs): a, b, and a
    valid model in ``outside/`` next to them."""
    root = tmp_path / "models"
    for k in ("a", "b"):
        shutil.copytree(random_models[k], root / k)
    shutil.copytree(random_models["c"], tmp_path / "outside")
    return root


def _with_index(model, entry):
    names = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: entry for n in names}}))


def _symlinked(model, target):
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").unlink()
    os.symlink(target, model / "model.safetensors")


TRAVERSALS = {
    "index entry ../": lambda m, out: _with_index(m, "../../outside/model.safetensors"),
    "index entry absolute": lambda m, out: _with_index(m, str(out / "model.safetensors")),
    "index entry through an inside directory": lambda m, out: _with_index(m, "x/../../../outside/model.safetensors"),
    "shard symlinked relative": lambda m, out: _symlinked(m, "../../outside/model.safetensors"),
    "shard symlinked absolute": lambda m, out: _symlinked(m, str(out / "model.safetensors")),
    "directory symlink inside": lambda m, out: (os.symlink("../../outside", m / "sub"), _with_index(m, "sub/model.safetensors")),
}


@pytest.mark.parametrize("command", ["merge", "validate"])
@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_paths_outside_the_model_are_refused_unopened(case, command, inputs, tmp_path, capsys):
    outside = tmp_path / "outside"
    evil = inputs / "b"
    TRAVERSALS[case](evil, outside)
    (evil / "x").mkdir()
    recipe = _recipe(tmp_path, inputs / "a", evil)
    before = _snapshot(tmp_path)
    watch = OpenWatch(outside)
    try:
        (outside / "model.safetensors").open("rb").close()
        assert watch.events(), "inotify saw no open of the outside file: the check below would prove nothing"
        args = ["merge", recipe, str(tmp_path / "out"), "--local", "-q"] if command == "merge" else ["validate", recipe]
        code, lines = _cli(capsys, *args)
        opened = watch.events()
    finally:
        watch.close()
    _one_error(code, lines, "points outside the model directory", str(evil))
    assert "model.safetensors" in lines[0] and "bytes" not in lines[0], lines[0]
    assert opened == 0, "the file outside the model was opened"
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../../../../../../etc/passwd"])
def test_system_file_as_shard_says_nothing_about_it(target, inputs, tmp_path, capsys):
    _with_index(inputs / "b", target)
    code, lines = _cli(capsys, "validate", _recipe(tmp_path, inputs / "a", inputs / "b"))
    _one_error(code, lines, "points outside the model directory", "model.safetensors.index.json", repr(target))
    assert "bytes" not in lines[0] and "root:" not in lines[0]


@pytest.mark.timeout(60)  # /dev/zero read as a header would never end: fail, do not hang
@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_device_in_the_model_is_refused(target, inputs, tmp_path, capsys):
    import stat

    (inputs / "b" / target).unlink()
    try:
        os.mknod(inputs / "b" / target, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    except OSError as e:
        pytest.skip(f"cannot create a device node here ({e.strerror})")
    code, lines = _cli(capsys, "merge", _recipe(tmp_path, inputs / "a", inputs / "b"), str(tmp_path / "out"), "--local", "-q")
    _one_error(code, lines, target, "not a regular file")
    assert not (tmp_path / "out").exists()


def _cache_repo(hub, name, files: dict[str, bytes]) -> object:
    """A Hugging Face cache repository: blobs by content hash, a snapshot of symlinks to them."""
    import hashlib

    repo = hub / f"models--{name.replace('/', '--')}"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for fname, data in files.items():
        h = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / h).write_bytes(data)
        os.symlink(f"../../blobs/{h}", snap / fname)
    return snap


def test_hugging_face_cache_layout(random_models, tmp_path, capsys):
    """Snapshot symlinks into the repository's blobs are followed; an entry reaching another
    repository's blobs is refused (the bound is the repository's cache folder)."""
    hub = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in random_models["b"].iterdir()}
    good = _cache_repo(hub, "org/good", files)
    code, lines = _cli(capsys, "merge", _recipe(tmp_path, random_models["a"], good), str(tmp_path / "out"), "--local", "-q")
    assert code == 0 and lines == [], lines
    import hashlib

    stolen = "../../../models--org--good/blobs/" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    names = json.loads(files["model.safetensors.index.json"])["weight_map"]
    evil = _cache_repo(hub, "evil/repo", {
        "config.json": files["config.json"],
        "model.safetensors.index.json": json.dumps({"weight_map": {n: stolen for n in names}}).encode(),
    })
    before = _snapshot(hub)
    code, lines = _cli(capsys, "merge", _recipe(tmp_path, random_models["a"], evil), str(tmp_path / "out2"), "--local", "-q")
    _one_error(code, lines, "points outside the model directory", "models--evil--repo")
    assert not (tmp_path / "out2").exists() and _snapshot(hub) == before


# -- recipes --------------------------------------------------------------------------------

def _alias_bomb() -> str:
    """The "billion laughs": nine levels of nine aliases, 9^9 strings once expanded."""
    lines = ['lol0: &l0 ["lollollollollol", "lollollollollol", "lollollollollol", "lollollollollol", "lollollollollol", '
             '"lollollollollol", "lollollollollol", "lollollollollol", "lollollollollol"]']
    for i in range(1, 10):
        lines.append(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nmerge_method: linear\n"


@pytest.mark.timeout(60)
def test_yaml_alias_bomb_fails_fast(tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb())
    assert len(p.read_bytes()) <= 1000
    code, lines = _cli(capsys, "merge", str(p), str(tmp_path / "out"), "--local")
    _one_error(code, lines, str(p), "expands to more than")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bomb.yaml"]


def test_recipe_with_anchors_still_loads(random_models, tmp_path, capsys):
    p = tmp_path / "anchors.yaml"
    p.write_text(
        "merge_method: linear\ndtype: bfloat16\nmodels:\n"
        f"  - model: {random_models['a']}\n    parameters: &half {{weight: 0.5}}\n"
        f"  - model: {random_models['b']}\n    parameters: *half\n"
    )
    code = main(["validate", str(p)])
    assert code == 0, capsys.readouterr().err


def test_recipe_not_utf8(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("merge_method: linear  # café\n".encode("latin-1"))
    code, lines = _cli(capsys, "merge", str(p), str(tmp_path / "out"), "--local")
    _one_error(code, lines, str(p), "not valid UTF-8")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latin1.yaml"]


def test_error_text_is_one_capped_line(inputs, tmp_path, capsys):
    """A header entry named with 5,000 characters: the message is cut, and says so."""
    f = inputs / "b" / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["y" * 5000] = {"dtype": "F33", "shape": [0], "data_offsets": [0, 0]}
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    code, lines = _cli(capsys, "validate", _recipe(tmp_path, inputs / "a", inputs / "b"))
    _one_error(code, lines, str(f), "more characters)")
    assert len(lines[0]) == len("mergeserve: error: ") + 2000


def test_error_text_escapes_control_characters(tmp_path, capsys):
    """A model path with a newline and a terminal escape in it, quoted as given."""
    code, lines = _cli(capsys, "validate", _recipe(tmp_path, tmp_path / "no\nsuch\x1b[31m", tmp_path / "b"))
    _one_error(code, lines, "not a readable local directory", "no such\\x1b[31m")
    assert "\x1b" not in lines[0]


# -- outputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["an input model", "inside an input model", "--models-dir", "above --models-dir"])
def test_output_over_inputs_is_refused(where, inputs, tmp_path, capsys):
    out = {"an input model": inputs / "a", "inside an input model": inputs / "a" / "merged",
           "--models-dir": inputs, "above --models-dir": tmp_path}[where]
    recipe = _recipe(tmp_path, "a", "b")
    before = _snapshot(tmp_path)
    code, lines = _cli(capsys, "merge", recipe, str(out), "--local", "-q", "--overwrite", "--models-dir", str(inputs))
    _one_error(code, lines, "overlaps the input")
    assert _snapshot(tmp_path) == before


def test_overwrite_onto_a_file_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a checkpoint")
    code, lines = _cli(capsys, "merge", _recipe(tmp_path, inputs / "a", inputs / "b"), str(out), "--local", "-q", "--overwrite")
    _one_error(code, lines, str(out), "not a directory")
    assert out.read_text() == "not a checkpoint"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["models", "out", "outside", "recipe.yaml"]


def test_second_merge_to_the_same_output_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, inputs / "a", inputs / "b")
    first = StagingDir(out)  # a merge to OUT in progress: its staging directory, locked
    (first.path / "model.safetensors").write_bytes(b"half written")
    try:
        code, lines = _cli(capsys, "merge", recipe, str(out), "--local", "-q")
        _one_error(code, lines, str(out), "another merge is writing it")
        assert (first.path / "model.safetensors").read_bytes() == b"half written"
    finally:
        first.discard()
    assert main(["merge", recipe, str(out), "--local", "-q"]) == 0  # once it is gone, the output is free
    assert sorted(x.name for x in tmp_path.iterdir()) == ["models", "out", "outside", "recipe.yaml"]


def test_failed_merge_removes_the_parents_it_created(inputs, tmp_path, capsys):
    """The merge fails after its staging directory exists (a NaN found while merging)."""
    import torch
    from safetensors.torch import load_file, save_file

    f = inputs / "b" / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.self_attn.v_proj.weight"].view(-1)[3] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    assert torch.isnan(load_file(f)["model.layers.1.self_attn.v_proj.weight"]).any()
    code, lines = _cli(capsys, "merge", _recipe(tmp_path, inputs / "a", inputs / "b"), str(tmp_path / "new" / "deeper" / "out"), "--local", "-q")
    _one_error(code, lines, "NaN")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["models", "outside", "recipe.yaml"]
