"""Run the serving application: start (or join) Ray, deploy, wait for readiness, serve until
Ctrl-C or SIGTERM, then shut down without leaving engine processes behind.

Request path (see serve/ingress.py): HAProxy (Ray Serve's, with mergeserve's rules) checks the key
and routes by ``model`` to that model's replica, which serves vLLM's OpenAI app itself.

vLLM's engine runs in child processes (``VLLM::EngineCore``) of the replica; when the replica is
killed rather than shut down they survive, orphaned, holding gigabytes. So shutdown here is
ordered: Serve first (replicas stop their engines, HAProxy is stopped), then Ray, then every
process that was a descendant of this one before shutdown and is still alive is killed by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml

from mergeserve.errors import ClusterError, InputError
from mergeserve.serve import ingress
from mergeserve.serve.engine import (
    MAX_LOGPROBS,
    MAX_N,
    Checkpoint,
    check_fp8_support,
    fp8_cpu_weights,
    inspect_checkpoint,
    llm_config,
)
from mergeserve.serve.haproxy import MAX_BODY_BYTES, app_name
from mergeserve.serve.process import reap

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Model names travel in HAProxy's configuration and in URLs: letters, digits and . _ - / only.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


@dataclass
class ServeOptions:
    checkpoints: list[str]
    names: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    replicas: int | str = 1
    address: str | None = None
    device: str = "auto"  # auto | cpu | gpu
    max_model_len: int = 4096
    quantize_fp8: bool = False
    kv_cache_gib: int = 1
    trust_remote_code: bool = False
    enforce_eager: bool = False
    metrics_port: int = 8080
    engine_metrics: bool = True
    fp8_weights: str = "auto"  # auto | bf16 | fp8: how the CPU plugin holds FP8 weights
    fp8_kernel: str = "auto"  # auto | mergeserve
    max_body_bytes: int = MAX_BODY_BYTES
    max_n: int = MAX_N
    max_logprobs: int = MAX_LOGPROBS
    ready_timeout_s: float = 900.0


def resolve_checkpoints(opts: ServeOptions) -> list[Checkpoint]:
    if opts.names and len(opts.names) != len(opts.checkpoints):
        raise InputError(f"--name: got {len(opts.names)} names for {len(opts.checkpoints)} checkpoints")
    ckpts = [inspect_checkpoint(p, n) for p, n in zip(opts.checkpoints, opts.names or [None] * len(opts.checkpoints))]
    names = [c.name for c in ckpts]
    bad = [n for n in names if not MODEL_NAME.fullmatch(n)]
    if bad:
        raise InputError(f"--name: {bad[0]!r} is not a model name (letters, digits and . _ - / only, at most 128)")
    apps = [app_name(n) for n in names]
    dup = sorted({n for n, a in zip(names, apps) if apps.count(a) > 1})
    if dup:
        raise InputError(f"--name: model names must be unique, {dup} repeats (give each checkpoint a --name)")
    return ckpts


def _local_gpus() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return bool(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def llm_configs(opts: ServeOptions, ckpts: list[Checkpoint], accelerator: str, env: dict[str, str],
                check_hardware: bool = True) -> list[dict[str, Any]]:
    """One LLMConfig dict per checkpoint; ``env``: Ray Serve's switches for the replicas."""
    for c in ckpts:
        if check_hardware:
            check_fp8_support(c, accelerator, opts.quantize_fp8)
    # emit-config targets another cluster: its memory is unknown here, so auto means bf16 there
    fp8_weights = fp8_cpu_weights(ckpts, opts.fp8_weights, opts.kv_cache_gib) if check_hardware else (
        "bf16" if opts.fp8_weights == "auto" else opts.fp8_weights)
    return [
        llm_config(
            c, accelerator=accelerator, max_model_len=opts.max_model_len, quantize=opts.quantize_fp8,
            kv_cache_gib=opts.kv_cache_gib, replicas=opts.replicas, trust_remote_code=opts.trust_remote_code,
            enforce_eager=opts.enforce_eager, engine_metrics=opts.engine_metrics, fp8_weights=fp8_weights,
            fp8_kernel=opts.fp8_kernel, max_n=opts.max_n, max_logprobs=opts.max_logprobs, env=env,
        )
        for c in ckpts
    ]


def _check_limits(opts: ServeOptions) -> None:
    for flag, value in (("--max-body-kib", opts.max_body_bytes), ("--max-n", opts.max_n), ("--max-logprobs", opts.max_logprobs)):
        if value < 1:
            raise InputError(f"{flag}: must be at least 1, got {value}")


def emit_config(opts: ServeOptions, path: str) -> str:
    """Write the same applications as a Ray Serve config file (``serve deploy FILE``).

    The controller's environment carries HAProxy's switches; it applies when that config starts
    Serve on the cluster. The API key appears only as a salted hash."""
    _check_limits(opts)
    ckpts = resolve_checkpoints(opts)
    accelerator = opts.device if opts.device != "auto" else ("gpu" if _local_gpus() else "cpu")
    salt = ingress.new_salt()
    run_dir = "/tmp/mergeserve-serve"  # on the cluster's nodes
    env = ingress.controller_env([c.name for c in ckpts], opts.api_key, salt, run_dir, loopback=False,
                                 max_body=opts.max_body_bytes, own_ports=False)
    replica = ingress.replica_env(opts.api_key, salt, loopback=False, max_body=opts.max_body_bytes)
    # the target cluster's hardware is not this machine's: no local FP8 check here
    configs = llm_configs(opts, ckpts, accelerator, replica, check_hardware=False)
    doc = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": opts.host, "port": opts.port},
        "controller_options": {"runtime_env": {"env_vars": env}},
        "applications": [
            {"name": app_name(c.name), "route_prefix": ingress.route_prefix(c.name),
             "import_path": "mergeserve.serve.builder:build_model_app", "args": {"llm_config": cfg}}
            for c, cfg in zip(ckpts, configs)
        ],
    }
    text = "# Ray Serve config written by `mergeserve serve --emit-config`; deploy with `serve deploy`.\n"
    text += yaml.safe_dump(doc, sort_keys=False)
    with open(path, "w") as f:
        f.write(text)
    return path


def _become_subreaper() -> None:
    """Orphans of our descendants (an engine's workers when the engine is killed, Ray's agents
    when raylet dies) are re-parented to this process instead of init, so :meth:`Server.stop`
    still finds and ends them."""
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux/glibc: orphans go to init as usual


def _import_app_modules() -> None:
    import mergeserve.serve.builder  # noqa: F401
    import mergeserve.serve.ray_llm_adapter  # noqa: F401


def _raise_if_failed(models: list[str]) -> None:
    """Stop waiting at once when Serve has given up on a model's application."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001 - status not available yet: keep waiting
        return
    for m in models:
        app = apps.get(app_name(m))
        if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
            message = (app.message or "deployment failed").strip().splitlines()
            raise ClusterError(f"{m}: {message[-1][:500]} (the engines' logs: /tmp/ray/session_latest/logs/serve/)")


class Server:
    """A running application; :meth:`stop` is idempotent and reaps leftover engine processes."""

    def __init__(self, opts: ServeOptions, on_ray_started=None):
        self.opts = opts
        # ray.init installs its own SIGTERM handler, which kills the driver on the spot and leaves
        # the engines orphaned: this callback takes the signals back right after Ray starts.
        self._on_ray_started = on_ray_started
        self.own_ray = False
        self.url = f"http://{opts.host}:{opts.port}"
        self.models: list[str] = []
        self._stopped = False
        self._run_dir: str | None = None

    def start(self) -> Server:
        _check_limits(self.opts)
        ckpts = resolve_checkpoints(self.opts)  # before Ray: bad input fails in milliseconds
        self.models = [c.name for c in ckpts]
        accelerator = self.opts.device
        if accelerator == "auto" and not self.opts.address:  # a local Ray has this machine's devices
            accelerator = "gpu" if _local_gpus() else "cpu"
        ingress.find_haproxy()
        ingress.check_port(self.opts.host, self.opts.port)
        loopback = not self.opts.address and self.opts.host in LOOPBACK_HOSTS
        salt = ingress.new_salt()
        self._run_dir = ingress.new_run_dir()
        env = ingress.controller_env(self.models, self.opts.api_key, salt, self._run_dir, loopback, self.opts.max_body_bytes)
        replica_env = ingress.replica_env(self.opts.api_key, salt, loopback, self.opts.max_body_bytes)
        if accelerator != "auto":  # FP8 support checked here, before Ray
            configs = llm_configs(self.opts, ckpts, accelerator, replica_env)
        os.environ.update(env)  # before Ray's modules are imported: they read these at import
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        _become_subreaper()
        # The application's modules (Ray Serve LLM, vLLM's config) take seconds to import: here,
        # while Ray starts, rather than after it.
        prefetch = threading.Thread(target=_import_app_modules, name="mergeserve-imports", daemon=True)
        prefetch.start()
        import ray
        from ray import serve

        self._start_ray(len(ckpts))
        if self._on_ray_started:
            self._on_ray_started()
        # progress for a start-up that takes a minute or two (engines compile)
        print(f"mergeserve: Ray is up; starting {len(ckpts)} engine(s) for {', '.join(self.models)}", file=sys.stderr, flush=True)
        try:
            if accelerator == "auto":
                accelerator = "gpu" if ray.cluster_resources().get("GPU", 0) else "cpu"
                configs = llm_configs(self.opts, ckpts, accelerator, replica_env)
            try:
                serve.start(proxy_location="HeadOnly", http_options={"host": self.opts.host, "port": self.opts.port},
                            controller_options={"runtime_env": {"env_vars": env}})
            except Exception as e:  # noqa: BLE001 - Ray wraps HAProxy's start-up failure in its task error
                lines = [x for x in str(e).strip().splitlines() if x.strip()]
                raise ClusterError(f"Ray Serve's HTTP front end (HAProxy) did not start: {lines[-1][:400] if lines else type(e).__name__}") from None
            prefetch.join()
            from mergeserve.serve.builder import build_model_app

            for c, cfg in zip(ckpts, configs):
                try:
                    serve.run(build_model_app({"llm_config": cfg}), name=app_name(c.name), route_prefix=ingress.route_prefix(c.name),
                              blocking=False)
                except RuntimeError as e:  # Serve gave up after replica start-up failures
                    raise ClusterError(
                        f"{c.name}: {str(e).splitlines()[0]} (the engines' errors are in Ray's logs: "
                        "/tmp/ray/session_latest/logs/serve/)"
                    ) from None
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_ray(self, engines: int) -> None:
        import ray

        try:
            if self.opts.address:
                ray.init(address=self.opts.address, log_to_driver=False)
            else:
                # Each LLMServer replica reserves 2 CPUs; on a small machine oversubscribe so that
                # every replica schedules (the engine itself uses one core, the front end another).
                from mergeserve.cluster.session import start_embedded

                n = engines * (self.opts.replicas if isinstance(self.opts.replicas, int) else 1)
                start_embedded(
                    num_cpus=max(os.cpu_count() or 1, 2 * n + 2), _metrics_export_port=self.opts.metrics_port,
                    # no idle workers started ahead: every process here is a replica, an engine or Serve's own
                    _system_config={"worker_niceness": 0, "enable_worker_prestart": False, "prestart_worker_first_driver": False},
                )
                self.own_ray = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            self.stop()
            where = self.opts.address or "a local Ray"
            raise ClusterError(f"cannot start or join {where}: {str(e).strip().splitlines()[-1]}") from None
        except BaseException:  # e.g. Ctrl-C while Ray starts
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Every model answers one token through HAProxy (``/v1/models`` is HAProxy's own answer)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.opts.api_key}"} if self.opts.api_key else {}
        deadline = time.time() + self.opts.ready_timeout_s
        waiting = list(self.models)
        while waiting and time.time() < deadline:
            _raise_if_failed(waiting)
            try:
                r = httpx.post(f"{self.url}/v1/completions", headers=headers, timeout=30,
                               json={"model": waiting[0], "prompt": "ready?", "max_tokens": 1})
                if r.status_code == 200:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if waiting:
            raise ClusterError(f"{', '.join(waiting)}: not ready after {self.opts.ready_timeout_s:.0f} s (see Ray's logs)")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        import psutil
        import ray
        from ray import serve

        try:
            family = psutil.Process().children(recursive=True)
        except psutil.Error:
            family = []
        try:
            if ray.is_initialized():
                if self.own_ray or not self.opts.address:
                    serve.shutdown()
                else:
                    for m in self.models:
                        serve.delete(app_name(m))
        except Exception:  # noqa: BLE001 - shutting down regardless; Ray and the PIDs below still go
            pass
        finally:
            if ray.is_initialized():
                if self.own_ray:
                    from mergeserve.cluster.session import shutdown_embedded

                    shutdown_embedded()
                else:
                    ray.shutdown()
            reap(family, timeout=15)  # e.g. VLLM::EngineCore orphaned by its replica: end it by PID
            if self._run_dir:
                shutil.rmtree(self._run_dir, ignore_errors=True)


def serve_forever(opts: ServeOptions, on_ready=print) -> None:
    """Start, report readiness, block until SIGINT/SIGTERM, then stop cleanly.

    A signal during start-up interrupts it (the deploy wait is plain Python, so the handler's
    KeyboardInterrupt lands there) and the partial application is torn down the same way.
    """
    stop = threading.Event()
    starting = [True]

    def on_signal(*_):
        stop.set()
        if starting[0]:
            raise KeyboardInterrupt

    def trap():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on_signal)

    trap()
    server = Server(opts, on_ray_started=trap)
    try:
        try:
            server.start()
        except (KeyboardInterrupt, SystemExit):
            # our handler (KeyboardInterrupt) or Ray's, active while ray.init runs (SystemExit):
            # either way start() has already stopped what it started
            return
        starting[0] = False
        on_ready(
            f"serving {', '.join(server.models)} at {server.url}/v1 (OpenAI API)"
            + (f"; Prometheus metrics at http://127.0.0.1:{opts.metrics_port}/metrics" if server.own_ray else "")
            + "; Ctrl-C or SIGTERM stops"
        )
        while not stop.wait(0.5):
            pass
    finally:
        starting[0] = False
        trap()  # ours again, also where start() was cut short inside ray.init (Ray's handlers)
        server.stop()
        # The handlers stay: Ray's shutdown can deliver a late SIGINT/SIGTERM, which must not
        # turn a clean stop into a death by signal. serve_forever owns the process's signals.
