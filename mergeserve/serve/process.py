"""Ending a server process and everything it started, by PID.

vLLM's ``EngineCore`` processes outlive a parent that dies before it reaps them, and Ray's
workers can linger for a while after ``ray.shutdown()``. Whoever starts ``mergeserve serve`` (or
``vllm serve``) as a child ends it here: SIGTERM so it shuts down in order, then whatever of its
process tree (snapshotted before the signal, since orphans are re-parented) is still alive is
killed by PID. Never by name: ``pkill -f`` would hit other users' engines.
"""

from __future__ import annotations

import signal
import subprocess


def reap(family: list, timeout: float = 20) -> list[str]:
    """Wait up to ``timeout`` s for ``family`` (psutil processes) to exit; kill the rest by PID.

    Returns ``"PID cmdline"`` for each process that had to be killed."""
    import psutil

    _, alive = psutil.wait_procs(family, timeout=timeout)
    killed = []
    for p in alive:
        try:
            killed.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.Error:  # exited meanwhile
            pass
    psutil.wait_procs(alive, timeout=10)
    return killed


def stop_process_tree(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """SIGTERM ``proc``, wait ``timeout`` s (then SIGKILL), and end what it left running.

    Returns the processes of its tree that outlived it and had to be killed (empty when the server
    shut down cleanly)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.Error:  # exited between poll() and the snapshot
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    return reap(family)
