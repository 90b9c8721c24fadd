"""`mergeserve serve --emit-config` deploys with Ray's own `serve deploy` on a running cluster
(ray.cluster_utils.Cluster with its dashboard, which `serve deploy` talks to), and the deployed
endpoint behaves as `mergeserve serve`'s: HAProxy in front, the key checked, routed by model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving_fixtures import free_port

pytestmark = pytest.mark.slow

SERVE = str(Path(sys.executable).parent / "serve")


def test_emitted_config_deploys_with_serve_deploy(tiny_family, tmp_path):
    from ray.cluster_utils import Cluster

    port, dashboard = free_port(), free_port()
    cfg = tmp_path / "serve.yaml"
    p = subprocess.run(
        [sys.executable, "-m", "mergeserve.cli", "serve", str(tiny_family["mistral"]["code"]), "--name", "code", "--api-key", "dk",
         "--port", str(port), "--enforce-eager", "--device", "cpu", "--emit-config", str(cfg)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "dk" not in yaml.safe_load(cfg.read_text())["controller_options"]["runtime_env"]["env_vars"].values()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
    })
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    address = ["--address", f"http://127.0.0.1:{dashboard}"]
    try:
        d = subprocess.run([SERVE, "deploy", str(cfg), *address], capture_output=True, text=True, timeout=300, env=env)
        assert d.returncode == 0, d.stdout + d.stderr
        url, deadline, status = f"http://127.0.0.1:{port}", time.time() + 600, None
        while time.time() < deadline:
            try:
                status = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer dk"}, timeout=30,
                                    json={"model": "code", "prompt": "def f(x):", "max_tokens": 4}).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert status == 200, status
        assert httpx.post(url + "/v1/completions", json={"model": "code", "prompt": "x"}).status_code == 401
        assert httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer dk"},
                          json={"model": "nope", "prompt": "x"}).status_code == 404
    finally:
        subprocess.run([SERVE, "shutdown", "-y", *address], capture_output=True, timeout=120, env=env)
        cluster.shutdown()
