"""Ray for one command: an embedded cluster on this machine, or an existing cluster joined.

An embedded cluster (no ``--address``) belongs to the command that starts it, so it is set up for
that: lean (no autoscaler, log monitor or API server), reachable only from this machine (its
servers listen on loopback), quiet (no token-auth banner on the user's stderr; token auth stays
on), with its token file readable by its owner only, and guarded: its processes end with the
command, even a SIGKILLed one (:mod:`~mergeserve.cluster.guardian`). The merge, the sweep and
``mergeserve serve`` all start theirs here.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Any

from mergeserve.cluster import guardian
from mergeserve.errors import ClusterError


def probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast on an address nobody listens on (ray.init would retry for a long time)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"--address {address}: Ray cluster unreachable ({e.strerror or e})") from None


def start_embedded(**init_kwargs: Any) -> None:
    """``ray.init(address="local", ...)`` as described above; ``init_kwargs`` add to or override
    its arguments (by default one CPU slot per core)."""
    import ray

    from mergeserve.cluster import ray_adapter

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray_adapter.private_token_file()
    kwargs = {
        "num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False, "configure_logging": False,
        # Ray runs workers at nice 15 by default; here they are the command's work itself, and at
        # 15 they lost the CPU to everything else, the driver's helper threads included.
        "_system_config": {"worker_niceness": 0},
        **init_kwargs,
    }
    guardian.start()  # before ray.init: it learns the cluster's processes as they appear
    with ray_adapter.lean_head_node(), ray_adapter.loopback_node(), ray_adapter.quiet_token_banner():
        # "local": a new embedded cluster even if RAY_ADDRESS or a running one is found
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    guardian.track(ray_adapter.node_pids())


def connect(address: str | None, **init_kwargs: Any) -> bool:
    """Initialise Ray; returns True if this call started an embedded cluster (to stop after)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        start_embedded(**init_kwargs)
        return True
    if address != "auto":
        probe(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    return False


def shutdown_embedded() -> None:
    """Stop the embedded cluster this process started, and wait for its processes to exit.

    ``ray.shutdown`` stops the processes one by one, each with SIGTERM and up to 1 s of grace
    before SIGKILL, which the autoscaler monitor outlasts: should one run despite
    :func:`~mergeserve.cluster.ray_adapter.lean_head_node`, it gets SIGKILL first (an embedded
    cluster has nothing for it to scale).
    """
    import ray

    from mergeserve.cluster.ray_adapter import kill_monitor

    kill_monitor()
    ray.shutdown()
    guardian.stop()


@contextmanager
def ray_session(address: str | None, **init_kwargs: Any):
    """Ray connected (see :func:`connect`) for the block; an embedded cluster is stopped after it."""
    own = connect(address, **init_kwargs)
    try:
        yield own
    finally:
        if own:
            shutdown_embedded()
