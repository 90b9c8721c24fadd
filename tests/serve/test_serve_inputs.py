"""`mergeserve serve` input checks that fail before Ray starts, and FP8 on this hardware."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mergeserve.serve.engine import inspect_checkpoint


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


def test_fp8_is_refused_on_a_cpu_that_is_not_x86(merged_tiny, monkeypatch):
    """Mocked machine type: this test runs on x86, and an Arm CPU cannot be put in its place."""
    import platform

    from mergeserve.errors import UnsupportedError
    from mergeserve.serve.engine import check_fp8_support

    ckpt = inspect_checkpoint(merged_tiny["fp8"])
    check_fp8_support(ckpt, "cpu", False)  # x86 here: accepted
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(UnsupportedError, match="aarch64 CPU"):
        check_fp8_support(ckpt, "cpu", False)
    check_fp8_support(ckpt, "gpu", False)  # GPUs have vLLM's own kernels


def _broken_fp8_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of an FP8 checkpoint whose safetensors header ``edit`` changes (tensor bytes kept)."""
    import json
    import shutil
    import struct

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    edit(entries)
    # re-lay the remaining tensors contiguously (the header check wants no gaps)
    out, offset, chunks = {"__metadata__": header.get("__metadata__", {})}, 0, []
    for k, v in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        chunks.append(data[a:b])
        out[k] = {**v, "data_offsets": [offset, offset + b - a]}
        offset += b - a
    text = json.dumps(out).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return dst


SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"


def test_fp8_scales_that_do_not_match_are_refused_before_the_engine(merged_tiny, tmp_path):
    def drop(entries):
        del entries[SCALE]

    def reshape(entries):
        a, b = entries[SCALE]["data_offsets"]
        shape = entries[SCALE]["shape"]
        entries[SCALE]["shape"] = [shape[0] * shape[1], 1]  # same bytes, wrong block grid

    for name, edit, words in (("missing", drop, "has no"), ("reshaped", reshape, "expected float32")):
        d = _broken_fp8_copy(merged_tiny["fp8"], tmp_path / name, edit)
        p = _serve(str(d), "--device", "cpu")
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "q_proj.weight" in lines[0] and words in lines[0], p.stderr


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


def test_a_taken_port_is_named_before_anything_starts(merged_tiny):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        p = _serve(str(merged_tiny["bf16"]), "--port", str(port))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], p.stderr
    assert time.time() - t0 < 30  # refused before Ray starts


def test_a_missing_haproxy_binary_is_named(merged_tiny, tmp_path):
    """No HAProxy: $MERGESERVE_HAPROXY pointing at nothing stands in for a machine without one."""
    import os

    missing = tmp_path / "no-haproxy"
    p = subprocess.run([sys.executable, "-m", "mergeserve.cli", "serve", str(merged_tiny["bf16"])], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "MERGESERVE_HAPROXY": str(missing)})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "HAProxy not found" in lines[0] and str(missing) in lines[0], p.stderr
