"""The Ray internals behind mergeserve/cluster/ray_adapter.py are still where it expects them.

The adapter degrades silently at run time (Ray then starts its monitors as usual, only slower),
so these tests are what notices a Ray upgrade moving them: each names the symbol that changed.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

ADAPTER = "mergeserve/cluster/ray_adapter.py"


def test_ray_params_take_the_monitor_switches():
    from ray._private import parameter

    params = inspect.signature(parameter.RayParams.__init__).parameters
    assert {"no_monitor", "include_log_monitor"} <= set(params), (
        f"ray._private.parameter.RayParams.__init__ no longer takes no_monitor / include_log_monitor: update {ADAPTER}"
    )


def test_head_node_starts_its_api_server_in_one_method():
    from ray._private.node import Node

    assert hasattr(Node, "start_api_server"), f"ray._private.node.Node.start_api_server is gone: update {ADAPTER}"
    assert "include_dashboard" in inspect.signature(Node.start_api_server).parameters, (
        f"ray._private.node.Node.start_api_server no longer takes include_dashboard: update {ADAPTER}"
    )


def test_running_node_lists_its_processes_by_type():
    from ray._private import node, ray_constants, worker

    assert hasattr(worker, "_global_node"), f"ray._private.worker._global_node is gone: update {ADAPTER}"
    assert getattr(ray_constants, "PROCESS_TYPE_MONITOR", None) == "monitor", (
        f"ray._private.ray_constants.PROCESS_TYPE_MONITOR changed: update {ADAPTER}"
    )
    assert "self.all_processes" in inspect.getsource(node.Node.__init__), (
        f"ray._private.node.Node no longer keeps all_processes: update {ADAPTER}"
    )


_PROBE = """
import json, ray
from ray._private import worker
from mergeserve.cluster.ray_adapter import lean_head_node
with lean_head_node():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
kinds = {k: len(v) for k, v in worker._global_node.all_processes.items() if v}
ray.shutdown()
print(json.dumps(kinds))
"""


@pytest.mark.slow
def test_embedded_head_node_starts_without_monitors_or_api_server():
    p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    kinds = json.loads(p.stdout.strip().splitlines()[-1])
    assert "raylet" in kinds and "gcs_server" in kinds, kinds  # the probe saw a running node
    started = sorted(set(kinds) & {"monitor", "log_monitor", "dashboard"})
    assert not started, f"ray.init started {started} despite {ADAPTER}.lean_head_node: Ray's internals changed"


def test_localhost_resolution_and_token_setup_are_where_the_adapter_expects():
    from ray._private import services
    from ray._private.authentication import authentication_token_setup as setup

    assert callable(getattr(services, "resolve_ip_for_localhost", None)), f"ray._private.services.resolve_ip_for_localhost is gone: update {ADAPTER}"
    assert callable(getattr(services, "is_localhost", None)), f"ray._private.services.is_localhost is gone: update {ADAPTER}"
    assert callable(getattr(setup, "_get_default_token_path", None)) and callable(getattr(setup, "generate_and_save_token", None)), (
        f"ray's token file helpers moved: update {ADAPTER}"
    )


_EMBEDDED = """
import json, os, psutil, ray
from mergeserve.cluster.session import shutdown_embedded, start_embedded
start_embedded(num_cpus=1, configure_logging=False)
me = psutil.Process()
listening = []
for p in [me, *me.children(recursive=True)]:
    try:
        listening += [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
from ray._private.authentication.authentication_token_setup import _get_default_token_path
mode = os.stat(_get_default_token_path()).st_mode & 0o777
shutdown_embedded()
print(json.dumps({"listening": listening, "token_mode": mode}))
"""


@pytest.mark.slow
def test_an_embedded_cluster_is_loopback_only_quiet_and_keeps_its_token_private():
    """Every server of the cluster (GCS, raylet, workers, agents) on loopback; nothing of Ray's on
    the command's stderr; the auth token file readable by its owner only."""
    import ipaddress

    p = subprocess.run([sys.executable, "-c", _EMBEDDED], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["listening"]) >= 3  # GCS, raylet, a worker at least

    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)

    assert all(loopback(ip) for ip in out["listening"]), out["listening"]
    assert out["token_mode"] == 0o600
    assert "Token authentication" not in p.stderr, p.stderr[-2000:]
