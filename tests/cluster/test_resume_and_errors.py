"""Interrupted and failing distributed merges, as whole `mergeserve merge` processes: a killed
driver resumed with --resume, changed inputs refused, an unreachable cluster, out of memory and a
full disk (real kernel limits: RLIMIT_AS and RLIMIT_FSIZE on the merge process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from mergeserve.merge.api import merge
from mergeserve.synthetic import Shape, make_random_model
from tests.oracle import load_tensors

pytestmark = pytest.mark.slow

TIES = {
    "merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
    "models": [{"model": "ft-a", "parameters": {"weight": 0.6, "density": 0.3}}, {"model": "ft-b", "parameters": {"weight": 0.4, "density": 0.5}}],
}
CLI = [sys.executable, "-m", "mergeserve.cli", "merge"]


def _recipe(tmp_path: Path, recipe: dict) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return str(p)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and, after it, anything it started that outlived it (by PID)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.kill()
    proc.wait(30)
    gone, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def _interrupted_run(tmp_path: Path, models: Path, out: Path) -> Path:
    """Start a distributed merge, SIGKILL its driver once a shard is finished; returns the staging dir."""
    stage = out.parent / f".{out.name}.partial"
    proc = subprocess.Popen(
        CLI + [_recipe(tmp_path, TIES), str(out), "--models-dir", str(models), "--out-shard-size", "20M", "--workers", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not list(stage.glob(".*.done.json")):
            time.sleep(0.05)
        assert proc.poll() is None, f"the merge ended before it could be interrupted: {proc.stderr.read().decode()[-2000:]}"
        assert list(stage.glob(".*.done.json")), "no shard finished in time"
    finally:
        _kill_tree(proc)
    assert not out.exists()
    return stage


def test_killed_driver_then_resume_finishes_bit_identical(medium_models, tmp_path):
    reference = merge(TIES, tmp_path / "reference", models_dir=medium_models, out_shard_size="20M", progress=False)
    out = tmp_path / "out"
    stage = _interrupted_run(tmp_path, medium_models, out)
    finished = len(list(stage.glob(".*.done.json")))
    p = subprocess.run(
        CLI + [_recipe(tmp_path, TIES), str(out), "--models-dir", str(medium_models), "--out-shard-size", "20M", "--resume", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", "Ray printed on the user's stderr (a banner?)"
    assert f"reused {finished} verified shard(s)" in p.stdout or "reused" in p.stdout, p.stdout
    assert not stage.exists()
    got, want = load_tensors(out), load_tensors(reference.out_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_resume_refuses_changed_inputs(medium_models, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(medium_models, models)
    out = tmp_path / "out"
    _interrupted_run(tmp_path, models, out)
    f = next((models / "ft-b").glob("*.safetensors"))
    os.utime(f, (time.time() + 5, time.time() + 5))  # same bytes, new mtime: counts as changed
    p = subprocess.run(
        CLI + [_recipe(tmp_path, TIES), str(out), "--models-dir", str(models), "--out-shard-size", "20M", "--resume", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert "ft-b" in p.stderr and "changed" in p.stderr, p.stderr
    assert not out.exists()


def test_unreachable_cluster_fails_fast(random_models, tmp_path):
    t0 = time.time()
    p = subprocess.run(
        CLI + [_recipe(tmp_path, TIES), str(tmp_path / "out"), "--models-dir", str(random_models["root"]), "--address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 4 and "127.0.0.1:9" in p.stderr and "unreachable" in p.stderr, p.stderr
    assert time.time() - t0 < 20
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("mergeserve: error: "), p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.yaml"], "a staging directory or lock was left behind"


def test_resume_with_nothing_to_resume_leaves_nothing(random_models, tmp_path):
    """--resume without an interrupted run, on an unreachable cluster: both fail, nothing stays."""
    p = subprocess.run(
        CLI + [_recipe(tmp_path, TIES), str(tmp_path / "out"), "--models-dir", str(random_models["root"]),
               "--resume", "--address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 4 and p.stderr.count("\n") == 1, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.yaml"]


def test_corrupt_run_state_on_resume(random_models, tmp_path):
    """The run state of an interrupted run, truncated: one line, exit 2; the staging directory
    stays as it was (it is the user's interrupted run)."""
    stage = tmp_path / ".out.partial"
    stage.mkdir()
    (stage / ".mergeserve-run.json").write_text('{"plan": "abc", "inp')
    p = subprocess.run(
        CLI + [_recipe(tmp_path, TIES), str(tmp_path / "out"), "--models-dir", str(random_models["root"]), "--resume", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "corrupt" in p.stderr and ".mergeserve-run.json" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == [".out.partial", "recipe.yaml"]
    assert [x.name for x in stage.iterdir()] == [".mergeserve-run.json"]


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for q in procs:
        try:
            if q.status() != psutil.STATUS_ZOMBIE:  # a zombie has exited (its new parent may never reap it)
                out.append(f"{q.pid} {q.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_embedded_ray_does_not_outlive_a_killed_driver(medium_models, tmp_path):
    """SIGKILL the driver once its Ray is up (GCS, raylet, both agents): within 30 s no process
    of its tree is left. Ray ties GCS and raylet to the driver; the agents would linger for a
    minute without the guardian (mergeserve/cluster/guardian.py)."""
    proc = subprocess.Popen(
        CLI + [_recipe(tmp_path, TIES), str(tmp_path / "out"), "--models-dir", str(medium_models), "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    family: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            names = " ".join(_alive(family))
            if all(n in names for n in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the merge ended before Ray was up: {proc.stderr.read().decode()[-2000:]}"
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait(30)
        deadline = time.time() + 30
        while _alive(family) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(family), f"outlived the driver: {_alive(family)}"
    finally:
        _kill_tree(proc)
        for q in family:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass


_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    import torch, mergeserve.merge.api  # mapped before the limit is set
    from mergeserve.cli import main
    kind, amount = sys.argv[1], int(sys.argv[2])
    if kind == "as":  # address space: what this process has mapped now plus a margin
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + amount, vm + amount))
    else:  # largest file this process may write; EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (amount, amount))
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """Two models with a 256 MB embedding: merging it needs far more than 300 MB of memory."""
    root = tmp_path_factory.mktemp("big-vocab")
    shape = Shape("llama", 2048, 1, 256, 16, 4, 65536)
    make_random_model(root / "x", shape, seed=1)
    make_random_model(root / "y", shape, seed=2)
    return root


def _limited(kind, amount, args):
    return subprocess.run([sys.executable, "-c", _LIMITED, kind, str(amount), *args], capture_output=True, text=True, timeout=300)


LINEAR = {
    "merge_method": "linear", "dtype": "bfloat16",
    "models": [{"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": 1}}],
}


def test_out_of_memory_names_the_shard(big_vocab, tmp_path):
    out = tmp_path / "out"
    p = _limited("as", 300 * 2**20, ["merge", _recipe(tmp_path, LINEAR), str(out), "--local", "-q", "--models-dir", str(big_vocab)])
    assert p.returncode == 3, p.stderr
    assert "out of memory" in p.stderr and "shard model" in p.stderr and "embed_tokens" in p.stderr, p.stderr
    assert not out.exists() and [x.name for x in tmp_path.iterdir()] == ["recipe.yaml"]


def test_full_disk_leaves_nothing(random_models, tmp_path):
    out = tmp_path / "out"
    recipe = dict(LINEAR, models=[{"model": "ft-a", "parameters": {"weight": 1}}, {"model": "ft-b", "parameters": {"weight": 1}}])
    p = _limited("fsize", 2**20, ["merge", _recipe(tmp_path, recipe), str(out), "--local", "-q", "--models-dir", str(random_models["root"])])
    assert p.returncode == 3, p.stderr
    assert "disk full" in p.stderr or "file size limit" in p.stderr, p.stderr
    assert not out.exists() and [x.name for x in tmp_path.iterdir()] == ["recipe.yaml"]


def test_ray_failures_are_mapped_to_errors_naming_the_shard():
    """Ray's own OOM and crash exceptions, constructed directly: a real Ray OOM kill needs the
    machine's memory exhausted, which a test cannot safely do (the mapping is what is tested)."""
    from ray.exceptions import OutOfMemoryError

    from mergeserve.cluster.pool import map_ray_error
    from mergeserve.errors import ResourceError

    shard = "model-00003-of-00007.safetensors"
    e = map_ray_error(OutOfMemoryError("Task was killed due to the node running low on memory."), f"shard {shard}")
    assert isinstance(e, ResourceError) and "out of memory" in str(e) and shard in str(e)
