"""Run the serving application: start (or join) Ray, deploy, wait for readiness, serve until
Ctrl-C or SIGTERM, then shut down without leaving engine processes behind.

vLLM's engine runs in child processes (``VLLM::EngineCore``) of the replica; when the replica is
killed rather than shut down they survive, orphaned, holding gigabytes. So shutdown here is
ordered: Serve first (replicas stop their engines), then Ray, then every process that was a
descendant of this one before shutdown and is still alive is killed by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import yaml

from mergeserve.errors import ClusterError, InputError
from mergeserve.serve.builder import AppArgs
from mergeserve.serve.engine import STREAM_INTERVAL_MS, Checkpoint, check_fp8_support, inspect_checkpoint, llm_config
from mergeserve.serve.process import reap

APP_NAME = "mergeserve"


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
    stream_interval_ms: float = STREAM_INTERVAL_MS
    ready_timeout_s: float = 900.0


def resolve_checkpoints(opts: ServeOptions) -> list[Checkpoint]:
    if opts.names and len(opts.names) != len(opts.checkpoints):
        raise InputError(f"--name: got {len(opts.names)} names for {len(opts.checkpoints)} checkpoints")
    ckpts = [inspect_checkpoint(p, n) for p, n in zip(opts.checkpoints, opts.names or [None] * len(opts.checkpoints))]
    names = [c.name for c in ckpts]
    dup = sorted({n for n in names if names.count(n) > 1})
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


def app_args(opts: ServeOptions, ckpts: list[Checkpoint], accelerator: str, check_hardware: bool = True) -> AppArgs:
    for c in ckpts:
        if check_hardware:
            check_fp8_support(c, accelerator, opts.quantize_fp8)
    configs = [
        llm_config(
            c, accelerator=accelerator, max_model_len=opts.max_model_len, quantize=opts.quantize_fp8,
            kv_cache_gib=opts.kv_cache_gib, replicas=opts.replicas, trust_remote_code=opts.trust_remote_code,
            enforce_eager=opts.enforce_eager, engine_metrics=opts.engine_metrics,
            stream_interval_ms=opts.stream_interval_ms,
        )
        for c in ckpts
    ]
    return AppArgs(llm_configs=configs, api_key=opts.api_key)


def emit_config(opts: ServeOptions, path: str) -> str:
    """Write the same application as a Ray Serve config file (``serve deploy FILE``)."""
    ckpts = resolve_checkpoints(opts)
    accelerator = opts.device if opts.device != "auto" else ("gpu" if _local_gpus() else "cpu")
    doc = {
        "http_options": {"host": opts.host, "port": opts.port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "mergeserve.serve.builder:build_app",
            # the target cluster's hardware is not this machine's: no local FP8 check here
            "args": app_args(opts, ckpts, accelerator, check_hardware=False).model_dump(),
        }],
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

    def start(self) -> Server:
        import ray
        from ray import serve

        from mergeserve.serve.builder import build_app

        ckpts = resolve_checkpoints(self.opts)  # before Ray: bad input fails in milliseconds
        self.models = [c.name for c in ckpts]
        accelerator = self.opts.device
        if accelerator == "auto" and not self.opts.address:  # a local Ray has this machine's devices
            accelerator = "gpu" if _local_gpus() else "cpu"
        if accelerator != "auto":
            args = app_args(self.opts, ckpts, accelerator)  # FP8 support checked here, before Ray
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        _become_subreaper()
        try:
            if self.opts.address:
                ray.init(address=self.opts.address, log_to_driver=False)
            else:
                # Each LLMServer replica reserves 2 CPUs; on a small machine oversubscribe so that
                # every replica schedules (the engine itself uses one core, the front end another).
                n = len(ckpts) * (self.opts.replicas if isinstance(self.opts.replicas, int) else 1)
                ray.init(
                    address="local", num_cpus=max(os.cpu_count() or 1, 2 * n + 2), include_dashboard=False,
                    log_to_driver=False, _metrics_export_port=self.opts.metrics_port,
                )
                self.own_ray = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            self.stop()
            where = self.opts.address or "a local Ray"
            raise ClusterError(f"cannot start or join {where}: {str(e).strip().splitlines()[-1]}") from None
        except BaseException:  # e.g. Ctrl-C while Ray starts
            self.stop()
            raise
        if self._on_ray_started:
            self._on_ray_started()
        # progress for a start-up that takes a minute or two (engines compile)
        print(f"mergeserve: Ray is up; starting {len(ckpts)} engine(s) for {', '.join(self.models)}", file=sys.stderr, flush=True)
        try:
            if accelerator == "auto":
                accelerator = "gpu" if ray.cluster_resources().get("GPU", 0) else "cpu"
                args = app_args(self.opts, ckpts, accelerator)
            serve.start(http_options={"host": self.opts.host, "port": self.opts.port})
            try:
                serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as e:  # Serve gave up after replica start-up failures
                raise ClusterError(
                    f"{str(e).splitlines()[0]} (the engines' errors are in Ray's logs: /tmp/ray/session_latest/logs/serve/)"
                ) from None
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.opts.api_key}"} if self.opts.api_key else {}
        deadline = time.time() + self.opts.ready_timeout_s
        while time.time() < deadline:
            try:
                r = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=5)
                if r.status_code == 200 and {m["id"] for m in r.json().get("data", [])} >= set(self.models):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ClusterError(f"the application was not ready after {self.opts.ready_timeout_s:.0f} s (see Ray's logs)")

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
                    serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - shutting down regardless; Ray and the PIDs below still go
            pass
        finally:
            if ray.is_initialized():
                ray.shutdown()
            reap(family, timeout=15)  # e.g. VLLM::EngineCore orphaned by its replica: end it by PID


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
