"""`mergeserve serve` input checks that fail before Ray starts, and FP8 on this hardware."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mergeserve.serve.engine import cpu_has_amx, inspect_checkpoint


def _serve(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mergeserve.cli", "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_missing_checkpoint(tmp_path):
    p = _serve(str(tmp_path / "nope"))
    assert p.returncode == 2 and "nope" in p.stderr and "not a directory" in p.stderr


def test_not_a_model_directory(tmp_path):
    p = _serve(str(tmp_path))
    assert p.returncode == 2 and "config.json" in p.stderr


def test_names_must_match_checkpoints(tiny_family):
    d = str(tiny_family["mistral"]["code"])
    p = _serve(d, d, "--name", "one")
    assert p.returncode == 2 and "--name" in p.stderr
    p = _serve(d, d)
    assert p.returncode == 2 and "unique" in p.stderr


def test_fp8_checkpoint_is_recognised(merged_tiny):
    assert inspect_checkpoint(merged_tiny["fp8"]).fp8 and not inspect_checkpoint(merged_tiny["bf16"]).fp8


@pytest.mark.skipif(cpu_has_amx(), reason="this CPU has AMX: FP8 serves here (test_fp8_serves_on_amx)")
def test_fp8_without_amx_says_why(merged_tiny):
    t0 = time.time()
    p = _serve(str(merged_tiny["fp8"]), "--device", "cpu")
    assert p.returncode == 2 and "AMX" in p.stderr and "FP8" in p.stderr, p.stderr
    p = _serve(str(merged_tiny["bf16"]), "--device", "cpu", "--quantize-fp8")
    assert p.returncode == 2 and "quantization on load" in p.stderr, p.stderr
    assert time.time() - t0 < 60


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_amx(), reason="vLLM's CPU FP8 kernels need AMX (test_fp8_without_amx_says_why runs instead)")
def test_fp8_serves_on_amx(merged_tiny, tmp_path):
    import os

    import httpx

    from mergeserve.serve.process import stop_process_tree
    from tests.serving_fixtures import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeserve.cli", "serve", str(merged_tiny["fp8"]), "--name", "fp8", "--port", str(port),
         "--metrics-port", str(free_port()), "--enforce-eager"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "fp8", "prompt": "def", "max_tokens": 4}, timeout=30)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        assert not stop_process_tree(proc)


@pytest.mark.slow
def test_sigterm_during_start_up_stops_cleanly(merged_tiny):
    """SIGTERM while Ray and the engine are still starting: the command stops at once, tears down
    what it started, exits 0, and leaves no process behind."""
    import os
    import signal

    import psutil

    from tests.serving_fixtures import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeserve.cli", "serve", str(merged_tiny["bf16"]), "--port", str(free_port()),
         "--metrics-port", str(free_port()), "--enforce-eager"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    me = psutil.Process(proc.pid)
    # Wait until ray.init has returned and the engines are starting. (A signal inside ray.init
    # itself can meet Ray's C++ signal handler, which aborts the process: Ray's, not ours.)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while time.time() < deadline and not any("Ray is up" in line for line in seen):
        assert proc.poll() is None, "".join(seen)[-2000:]
        time.sleep(0.2)
    time.sleep(3)  # the app is deploying, the engine starting
    family = me.children(recursive=True)
    assert family, "Ray did not start"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    reader.join(10)
    assert proc.returncode == 0, "".join(seen)[-2000:]
    assert time.time() - t0 < 90
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, [p.pid for p in alive]
