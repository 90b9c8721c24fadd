"""An embedded Ray cluster does not outlive its driver, even a SIGKILLed one.

Ray ties its GCS and raylet to the driver with ``PR_SET_PDEATHSIG``, and the workers leave when
their raylet goes. The agents (dashboard agent, runtime-env agent) see the raylet go too, but
first report its death to the GCS, which is gone, with a 60 s timeout (Ray 2.60,
``ray/_private/process_watcher.py`` -> ``publish_error_to_driver(..., 60)``): measured here, they
outlived a SIGKILLed driver by 60-65 s. Nothing in Ray's options shortens that; the raylet
starts them, out of our reach; and they rename themselves (``setproctitle``), which overwrites
their ``/proc/PID/environ``, so not even an inherited marker identifies them afterwards.

So the driver starts this file as a small process (before ``ray.init``) that reads a pipe from
the driver, and after ``ray.init`` writes to it the PIDs of the cluster's own processes (GCS,
raylet); until then, the driver's children started after the guardian are taken for them (only
``ray.init`` starts any). While the driver lives, the guardian notes every descendant of those
every ``POLL_S`` (PID and start time, from ``/proc``). The pipe reaches end-of-file when the driver
exits, however it exits; the guardian then SIGKILLs what it noted that still runs (same PID,
same start time: never a reused PID), and what those started since, and exits. Only Ray's
processes are noted: other children of the driver (a server a sweep leaves running) are not.
Standard library only: it runs as ``python -I -S guardian.py DRIVER_PID``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5  # agents start within a second or two of the raylet; a poll costs ~3 ms
_guardians: list[subprocess.Popen] = []  # each pipe's write end lives as long as the driver


def start() -> None:
    """Start a guardian for the cluster this process is about to start (Linux only)."""
    if not os.path.isdir("/proc"):
        return
    try:
        g = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C is for the driver
        )
    except OSError:
        return  # without a guardian, only the agents linger, for a minute
    _guardians.append(g)


def track(pids: list[int]) -> None:
    """Tell the guardians which processes (and their descendants) make up the cluster."""
    for g in _guardians:
        try:
            g.stdin.write("".join(f"{p}\n" for p in pids).encode())
            g.stdin.flush()
        except OSError:
            pass


def stop() -> None:
    """After ``ray.shutdown``: let the guardians sweep what is left of the cluster, and exit."""
    while _guardians:
        g = _guardians.pop()
        try:
            g.stdin.close()
            g.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            g.kill()


def _table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every process, from ``/proc/PID/stat``."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # the name before may hold spaces
        out[int(name)] = (int(fields[1]), int(fields[19]))
    return out


def _family(roots: dict[int, int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """{pid: start time} of the roots still running and all their descendants."""
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out = {p: t for p, t in roots.items() if table.get(p, (0, None))[1] == t}
    todo = list(out)
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in out and c != os.getpid():
                out[c] = table[c][1]
                todo.append(c)
    return out


def _main(driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    born = _table()[me][1]
    roots: dict[int, int] = {}
    seen: dict[int, int] = {}
    told, buf = False, b""
    while True:
        ready, _, _ = select.select([0], [], [], POLL_S)
        table = _table()
        if ready:
            data = os.read(0, 4096)
            if not data:
                break  # the driver has exited
            buf += data
            *lines, buf = buf.split(b"\n")
            roots.update({int(p): table[int(p)][1] for p in lines if p.strip() and int(p) in table})
            told = True
        if not told:  # ray.init is running: the driver's new children are the cluster's
            roots.update({p: t for p, (pp, t) in table.items() if pp == driver and t >= born and p != me})
        seen.update(_family(roots, table))
    for _ in range(5):  # again while some were found: one may have been starting a child
        alive = _family(seen, _table())
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


if __name__ == "__main__":
    _main(int(sys.argv[1]))
