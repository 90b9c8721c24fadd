"""The only place that reaches into Ray's private modules (``ray._private``), and why.

An embedded cluster (``mergeserve merge`` without ``--address``) has no use for three of the
processes ``ray.init`` starts: the autoscaler monitor (nothing to scale), the log monitor
(``log_to_driver=False``) and, with ``include_dashboard=False``, the API server (it then runs only
Ray's usage-stats module). On a small machine their start-up competes with the merge, and the
monitor outlasts ``ray.shutdown``'s SIGTERM grace period, holding shutdown up. ``ray.init`` has no
options for them, so:

- :func:`lean_head_node` sets the node parameters that skip the two monitors
  (``RayParams(no_monitor=True, include_log_monitor=False)``) and makes the head node's
  ``Node.start_api_server`` a no-op unless the dashboard is wanted, while ``ray.init`` runs;
- :func:`kill_monitor` SIGKILLs a monitor that started anyway, before ``ray.shutdown``.

Both degrade to doing nothing if Ray's internals differ from what they expect: Ray then starts
and stops those processes as usual, only slower. Three more, for an embedded cluster that only
this machine may reach and that ends with its command (see cluster/session.py):

- :func:`loopback_node`: Ray maps a 127.0.0.1 node address to the host's external one
  (``ray._private.services.resolve_ip_for_localhost``) so that other nodes could join; an embedded
  cluster has none, and its servers (GCS, raylet, workers, agents, metrics) bind loopback only
  when its node address is 127.0.0.1;
- :func:`node_pids`: the processes ``ray.init`` started (``ray._private.worker._global_node``),
  for the guardian;
- :func:`private_token_file`: Ray writes its token-auth token (``~/.ray/auth_token``) with the
  process umask, readable by every local user; it is created, or narrowed, to its owner;
- :func:`quiet_token_banner`: ``ray.init`` logs "Token authentication is enabled for this Ray
  cluster..." (its ``authentication_token_setup`` logger, printed by Python's last-resort
  handler) whenever it starts a cluster with token auth on by default: for an embedded cluster
  an internal detail of one command, kept off the user's stderr. Auth stays on as Ray sets it. ``tests/cluster/test_ray_adapter.py`` fails,
naming the symbol, when a Ray upgrade moves one of them.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager


def _params_patchable() -> bool:
    from ray._private import parameter

    return {"no_monitor", "include_log_monitor"} <= set(inspect.signature(parameter.RayParams.__init__).parameters)


@contextmanager
def lean_head_node():
    """While ``ray.init`` starts an embedded cluster: no autoscaler monitor, no log monitor, no
    API server (see the module docstring)."""
    try:
        from ray._private import node, parameter

        orig_params = parameter.RayParams.__init__
        orig_api = node.Node.start_api_server
        if not _params_patchable():
            raise LookupError
    except Exception:  # noqa: BLE001 - Ray's internals moved: start as usual
        yield
        return

    def lean_params(self, *args, **kwargs):
        kwargs["no_monitor"] = True
        kwargs["include_log_monitor"] = False
        orig_params(self, *args, **kwargs)

    def no_api_server(self, *args, **kwargs):
        if kwargs.get("include_dashboard"):
            return orig_api(self, *args, **kwargs)
        return None

    parameter.RayParams.__init__ = lean_params
    node.Node.start_api_server = no_api_server
    try:
        yield
    finally:
        parameter.RayParams.__init__ = orig_params
        node.Node.start_api_server = orig_api


def kill_monitor() -> None:
    """SIGKILL the embedded cluster's autoscaler monitor, if one runs (it has nothing to scale,
    and does not exit on SIGTERM within ``ray.shutdown``'s grace period)."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_constants import PROCESS_TYPE_MONITOR

        node = ray_worker._global_node
        for info in node.all_processes.get(PROCESS_TYPE_MONITOR, []) if node is not None else []:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(5)
    except Exception:  # noqa: BLE001 - Ray's internals moved: ray.shutdown still stops it, only slower
        pass


@contextmanager
def loopback_node():
    """While ``ray.init`` starts an embedded cluster: its node address stays 127.0.0.1."""
    from ray._private import services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: "127.0.0.1" if services.is_localhost(host) else original(host)
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def node_pids() -> list[int]:
    """PIDs of the processes ``ray.init`` started for the embedded cluster (GCS, raylet, ...)."""
    try:
        from ray._private import worker as ray_worker

        return [info.process.pid for infos in ray_worker._global_node.all_processes.values() for info in infos]
    except Exception:  # noqa: BLE001 - Ray's internals moved: the guardian then has nothing to watch
        return []


def private_token_file() -> None:
    """Create Ray's auth token readable by its owner only, or narrow an existing one to that."""
    import os

    from ray._private.authentication import authentication_token_setup as setup

    path = setup._get_default_token_path()
    if not path.exists():
        old = os.umask(0o077)
        try:
            setup.generate_and_save_token()
        finally:
            os.umask(old)
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass  # not ours to change: Ray still refuses calls without it


@contextmanager
def quiet_token_banner():
    """While ``ray.init`` starts an embedded cluster: no token-auth banner (see above)."""
    import logging

    from ray._private.authentication import authentication_token_setup as setup

    log = logging.getLogger(setup.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
