"""Where ``mergeserve merge`` runs: in its own process unless given an address (no Ray started,
not even imported), the summary saying so; ``--local`` and ``--address`` together refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

LINEAR = {
    "merge_method": "linear", "dtype": "bfloat16",
    "models": [{"model": "ft-a", "parameters": {"weight": 0.5}}, {"model": "ft-b", "parameters": {"weight": 0.5}}],
}
_RUN = textwrap.dedent(
    """
    import sys
    from mergeserve.cli import main
    code = main(sys.argv[1:])
    print("ray imported:", "ray" in sys.modules)
    sys.exit(code)
    """
)


def _merge(tmp_path, models, *extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(LINEAR))
    args = ["merge", str(recipe), str(tmp_path / "out"), "--models-dir", str(models), "-q", *extra]
    return subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=300)


def test_default_merges_in_this_process_without_ray(random_models, tmp_path):
    p = _merge(tmp_path, random_models["root"])
    assert p.returncode == 0, p.stderr
    assert "ran in this process: " in p.stdout and "CPU-seconds by phase: read" in p.stdout, p.stdout
    assert "ray imported: False" in p.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_local_and_address_exclude_each_other(random_models, tmp_path):
    p = _merge(tmp_path, random_models["root"], "--local", "--address", "local")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--local and --address" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.yaml"]


def test_the_console_command_prints_everything_and_keeps_its_exit_code(random_models, tmp_path):
    """``mergeserve`` (cli.run) ends a merge with os._exit: its output must be flushed first, and
    a refused merge must still exit 2 with its message."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(LINEAR))
    command = [str(Path(sys.executable).with_name("mergeserve")), "merge", str(recipe), str(tmp_path / "out"),
               "--models-dir", str(random_models["root"]), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("  peak memory:"), done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "already exists" in again.stderr
