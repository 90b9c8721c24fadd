"""Serve a sweep's best variants side by side and load-test them into one report.

``mergeserve sweep ... --serve-top K`` ends here: ``mergeserve serve`` (Ray Serve + vLLM) is
started as a child process on a free local port with the K checkpoints, each under its variant
name; once every model answers, :func:`mergeserve.loadtest.run_loadtest` drives all of them with
the same workload, and the server is stopped with SIGTERM (its leftovers killed by PID).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mergeserve.errors import ResourceError
from mergeserve.serve.process import stop_process_tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(log: Path) -> bool:
    """``mergeserve serve`` prints its "serving ..." line once every model has answered a request."""
    try:
        return any(line.startswith("serving ") for line in log.read_text(errors="replace").splitlines())
    except OSError:
        return False


def serve_and_loadtest(
    checkpoints: dict[str, str], out: Path, *, requests: int = 32, concurrency: int = 8, output_len: int = 32,
    input_len: int = 64, start_timeout: float = 900, progress: bool = True,
) -> dict:
    """Serve ``{name: checkpoint}`` together, load-test every model the same way; returns the report summary."""
    from mergeserve.loadtest import run_loadtest

    out.mkdir(parents=True, exist_ok=True)
    port, metrics = _free_port(), _free_port()
    names = list(checkpoints)
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", *checkpoints.values()]
    for n in names:
        cmd += ["--name", n]
    cmd += ["--port", str(port), "--metrics-port", str(metrics)]
    url = f"http://127.0.0.1:{port}"
    log = out / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + start_timeout
        while not _ready(log):
            if proc.poll() is not None:
                raise ResourceError(f"serving the top variants failed (exit {proc.returncode}); see {log}")
            if time.time() > deadline:
                raise ResourceError(f"serving the top variants: not ready after {start_timeout:.0f} s; see {log}")
            time.sleep(2)
        report = run_loadtest(
            url, names, concurrency=concurrency, requests=requests, input_len=input_len, output_len=output_len,
            tokenizer=checkpoints, out_dir=out, progress=progress,
        )
        print(report.table())
        return {"url": url, "models": checkpoints, "out_dir": str(out), "report": json.loads(report.to_json())}
    finally:
        stop_process_tree(proc)
