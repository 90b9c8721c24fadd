"""One real serving application per test session, shared by every test package that needs it
(tests/serve, tests/loadtest; loaded as a plugin by tests/conftest.py): `mergeserve serve` as a
subprocess (Ray Serve + the vLLM CPU engine) with two variants: the Marcoro14 tiny merge and one of
its parents.

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
    models: list[str]
    metrics_url: str
    proc: subprocess.Popen
    checkpoints: dict[str, Path]


def pytest_collection_modifyitems(session, config, items):
    """Run the tests that use the served app last (in their collected order), so the app, started
    once, is not held in memory while the rest of the suite runs; and among them, the ones marked
    ``disturbs_app`` (they kill part of it) after every other."""
    def rank(item) -> int:
        if "served" not in getattr(item, "fixturenames", ()):
            return 0
        return 2 if item.get_closest_marker("disturbs_app") else 1

    items[:] = sorted(items, key=rank)  # stable: the collected order holds within each rank


@pytest.fixture(scope="session")
def merged_tiny(tiny_dir, tmp_path_factory):
    from mergeserve.merge.api import merge

    out = tmp_path_factory.mktemp("serve-models")
    bf16 = merge(REPO / "configs/tiny/marcoro14-slerp.yaml", out / "marcoro14-tiny", models_dir=tiny_dir, progress=False)
    fp8 = merge(REPO / "configs/tiny/marcoro14-slerp.yaml", out / "marcoro14-tiny-fp8", models_dir=tiny_dir, out_dtype="fp8", progress=False)
    return {"bf16": bf16.out_dir, "fp8": fp8.out_dir, "code": tiny_dir / "mistral-code"}


@pytest.fixture(scope="session")
def served(merged_tiny, tmp_path_factory):
    port, metrics = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [
        sys.executable, "-m", "mergeserve.cli", "serve", str(merged_tiny["bf16"]), str(merged_tiny["code"]),
        "--name", "marcoro14-tiny", "--name", "mistral-code", "--port", str(port), "--api-key", API_KEY,
        "--metrics-port", str(metrics), "--enforce-eager",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            assert proc.poll() is None, f"mergeserve serve exited early:\n{log.read_text()[-4000:]}"
            if "serving marcoro14-tiny" in log.read_text():
                break
            time.sleep(1)
        else:
            raise AssertionError(f"not ready in time:\n{log.read_text()[-4000:]}")
        yield Served(url, API_KEY, ["marcoro14-tiny", "mistral-code"], f"http://127.0.0.1:{metrics}/metrics", proc, merged_tiny)
    finally:
        left = stop_process_tree(proc)
        assert proc.returncode == 0, f"exit code {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert not left, f"processes outlived mergeserve serve: {left}"
        with httpx.Client() as c:
            with pytest.raises(httpx.HTTPError):
                c.get(url + "/-/healthz", timeout=2)
