"""One real serving application per test session, shared by every test package that needs it
(tests/serve, tests/loadtest; loaded as a plugin by tests/conftest.py): `mergeserve serve` as a
subprocess (Ray Serve with HAProxy + the vLLM CPU engine) with four models: the Marcoro14 tiny
merge and one of its parents (``models``), and the same merge written as block FP8, served by
mergeserve's CPU FP8 kernel, beside its weights dequantized to a bf16 checkpoint (``fp8_models``).

Teardown sends SIGTERM, as a user's Ctrl-C or a process manager would, and then requires that
the command exits 0 and that no process it started (Ray, replicas, VLLM::EngineCore) survives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mergeserve.serve.process import stop_process_tree

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    api_key: str
    models: list[str]  # the bf16 merge and one of its parents
    fp8_models: list[str]  # the FP8 merge, and its dequantized bf16 copy
    metrics_url: str
    proc: subprocess.Popen
    checkpoints: dict[str, Path]


def pytest_configure(config):
    config.addinivalue_line("markers", "disturbs_app: changes the served app (kills an engine): runs after its other tests")


def pytest_collection_modifyitems(session, config, items):
    """Run the tests that use the served app last (in their collected order), so the app, started
    once, is not held in memory while the rest of the suite runs; of those, the ones that disturb
    the app (``disturbs_app``) run at the very end."""
    def uses(i):
        return "served" in getattr(i, "fixturenames", ())

    def disturbs(i):
        return i.get_closest_marker("disturbs_app") is not None

    items[:] = [i for i in items if not uses(i)] + [i for i in items if uses(i) and not disturbs(i)] + [i for i in items if disturbs(i)]


@pytest.fixture(scope="session")
def merged_tiny(tiny_dir, tmp_path_factory):
    from mergeserve.merge.api import merge

    out = tmp_path_factory.mktemp("serve-models")
    bf16 = merge(REPO / "configs/tiny/marcoro14-slerp.yaml", out / "marcoro14-tiny", models_dir=tiny_dir, progress=False)
    fp8 = merge(REPO / "configs/tiny/marcoro14-slerp.yaml", out / "marcoro14-tiny-fp8", models_dir=tiny_dir, out_dtype="fp8", progress=False)
    deq = dequantized_copy(fp8.out_dir, out / "marcoro14-tiny-fp8-deq")
    return {"bf16": bf16.out_dir, "fp8": fp8.out_dir, "fp8_deq": deq, "code": tiny_dir / "mistral-code"}


def dequantized_copy(src: Path, dst: Path) -> Path:
    """``src`` (block FP8) with every FP8 weight dequantized to bf16 (mergeserve.merge.quantize)
    and no quantization_config: what the FP8 checkpoint means, as a plain bf16 checkpoint."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mergeserve.merge.quantize import dequantize_fp8_block

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            if name.endswith(".weight_scale_inv"):
                continue
            scale = tensors.get(name.removesuffix(".weight") + ".weight_scale_inv")
            out[name] = dequantize_fp8_block(t, scale, torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t
        save_file(out, dst / f.name, metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="session")
def served(merged_tiny, tmp_path_factory):
    port, metrics = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    models = {"marcoro14-tiny": "bf16", "mistral-code": "code", "marcoro14-tiny-fp8": "fp8", "marcoro14-tiny-fp8-deq": "fp8_deq"}
    cmd = [
        sys.executable, "-m", "mergeserve.cli", "serve", *(str(merged_tiny[k]) for k in models.values()),
        *(a for name in models for a in ("--name", name)), "--port", str(port), "--api-key", API_KEY,
        "--metrics-port", str(metrics), "--enforce-eager",
        "--fp8-kernel", "mergeserve",  # the plugin's kernel even where vLLM's AMX kernels could serve
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            assert proc.poll() is None, f"mergeserve serve exited early:\n{log.read_text()[-4000:]}"
            if "serving marcoro14-tiny" in log.read_text():  # the command's ready line
                break
            time.sleep(1)
        else:
            raise AssertionError(f"not ready in time:\n{log.read_text()[-4000:]}")
        names = list(models)
        yield Served(url, API_KEY, names[:2], names[2:], f"http://127.0.0.1:{metrics}/metrics", proc, merged_tiny)
    finally:
        left = stop_process_tree(proc)
        assert proc.returncode == 0, f"exit code {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert not left, f"processes outlived mergeserve serve: {left}"
        with httpx.Client() as c:
            with pytest.raises(httpx.HTTPError):
                c.get(url + "/-/healthz", timeout=2)
