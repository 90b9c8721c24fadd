"""Whole-process merge benchmark: mergeserve against mergekit-yaml and the I/O floor, side by side.

    .venv/bin/python benchmarks/merge_bench.py                          # TinyLlama shape, warm, 3 rounds
    .venv/bin/python benchmarks/merge_bench.py --shape mistral-7b --rounds 1   # cold (caches dropped)
    .venv/bin/python benchmarks/merge_bench.py --shape qwen-0.5b --sides mergeserve,mergeserve-ray

Makes two random bf16 checkpoints of the chosen shape once (cached under ``--work``), then runs
every side in turn, round after round (interleaved, so drift hits all sides alike), each as a fresh
process. Before each side the inputs are either read into the page cache (warm) or, with
``--cold`` (the default for mistral-7b, whose 29 GB of inputs exceed the page cache anyway), the
page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``: root). The recipe is the
Marcoro14 slerp (t gradients filtered on self_attn / mlp) over all layers of the shape.

For each side: wall time; peak RSS of the whole process tree (summed, sampled every 20 ms: for
Ray this includes GCS, raylet and the workers); read and write GB/s (the bytes the side read from
and wrote to storage, from /proc/PID/io of the tree, over its wall time); CPU-seconds of the tree
(the benchmark's reaped children); and for mergeserve its own CPU-seconds by phase (read, merge
math, quantize, hash, write: from its summary) and how long its merge threads waited for reads.

Sides:
- io-floor: reads both inputs with large sequential reads (O_DIRECT when cold) while writing a
  copy of the first with O_DIRECT (an output of the same size): what the disk allows a merge.
- mergekit, mergekit-async: ``mergekit-yaml`` 0.1.5, by default and with ``--async-write``.
- mergeserve: the default command (in one process); mergeserve-fp8: ``--out-dtype fp8``;
  mergeserve-local: ``--local``; mergeserve-ray: ``--address local`` (a Ray started for the
  command), -1w / -2w with 1 / 2 workers.

Speed-ups are against the faster mergekit side. ``--verify`` digests every output tensor and
checks that every bf16 side's output equals mergekit's (outputs are deleted after each side: at
most one 7B output exists at a time). mergekit's multi-threaded reductions differ from run to run
in the last bit of a few slerp coefficients (see README, "Equal to mergekit"): with
``OMP_NUM_THREADS=1`` in the environment its output is mergeserve's bit for bit. Run with PYTHONPATH=<repo> to measure a checkout other than
the one installed in the venv (the sides run the venv's ``mergeserve`` script).
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from mergeserve.merge.phases import PHASES  # noqa: E402 - no torch: the floor's process stays lean

ALL_SIDES = [
    "io-floor", "mergekit", "mergekit-async", "mergeserve", "mergeserve-fp8", "mergeserve-local",
    "mergeserve-ray", "mergeserve-ray-1w", "mergeserve-ray-2w", "mergekit-1t",
]
DEFAULT_SIDES = ["io-floor", "mergekit", "mergekit-async", "mergeserve", "mergeserve-fp8", "mergeserve-local"]
MERGEKIT = ("mergekit", "mergekit-async")  # the speed peers
# mergekit with one torch thread: the reference of --verify. With several threads torch splits the
# reductions of slerp's dot products and norms differently from run to run, so a few coefficients
# (and every element of their tensors) differ in the last bit; mergeserve runs each op on one thread.
MERGEKIT_REFERENCE = "mergekit-1t"
SIDE_ENV = {MERGEKIT_REFERENCE: {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
CHUNK = 16 << 20  # the floor's read and write size


def recipe(a: Path, b: Path, layers: int) -> dict:
    return {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]}],
        "merge_method": "slerp",
        "base_model": str(a),
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": "bfloat16",
    }


def command(side: str, cfg: Path, a: Path, b: Path, out: Path, cold: bool) -> list[str]:
    ms = [str(BIN / "mergeserve"), "merge", str(cfg), str(out), "-q"]
    mk = [str(BIN / "mergekit-yaml"), str(cfg), str(out), "--quiet"]
    floor = [sys.executable, str(Path(__file__).resolve()), "--floor", str(a), str(b), str(out)] + (["--direct"] if cold else [])
    return {
        "io-floor": floor,
        "mergekit": mk,
        "mergekit-async": mk + ["--async-write"],
        "mergekit-1t": mk,
        "mergeserve": ms,
        "mergeserve-fp8": ms + ["--out-dtype", "fp8"],
        "mergeserve-local": ms + ["--local"],
        "mergeserve-ray": ms + ["--address", "local"],
        "mergeserve-ray-1w": ms + ["--address", "local", "--workers", "1"],
        "mergeserve-ray-2w": ms + ["--address", "local", "--workers", "2"],
    }[side]


# -- the I/O floor (run as its own process: python merge_bench.py --floor A B OUT [--direct]) -------
def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def floor_copy(a: Path, b: Path, out: Path, direct: bool) -> None:
    """Read every input file of ``a`` and ``b`` in CHUNK reads (one thread per model, O_DIRECT
    with ``direct``) while writing ``a``'s files to ``out`` with O_DIRECT (a third thread)."""
    out.mkdir(parents=True)
    flag = os.O_DIRECT if direct else 0
    todo: queue.Queue = queue.Queue(maxsize=4)
    bufs: queue.Queue = queue.Queue()
    for _ in range(6):
        bufs.put(mmap.mmap(-1, CHUNK))
    errors: list[BaseException] = []

    def read(d: Path, keep: bool) -> None:
        try:
            own = mmap.mmap(-1, CHUNK)
            for f in _files(d):
                fd = os.open(f, os.O_RDONLY | flag)
                off = 0
                while True:
                    buf = bufs.get() if keep else own
                    n = os.preadv(fd, [buf], off)
                    if keep:
                        todo.put((f.name, off, n, buf) if n else (f.name, off, 0, None))
                        if not n:
                            bufs.put(buf)
                    off += n
                    if n < CHUNK:
                        break
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported by main
            errors.append(e)
        finally:
            if keep:
                todo.put(None)

    def write() -> None:
        fds: dict[str, tuple[int, int]] = {}
        try:
            while (item := todo.get()) is not None:
                name, off, n, buf = item
                if name not in fds:
                    p = out / name
                    fds[name] = (os.open(p, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644), os.open(p, os.O_WRONLY))
                dfd, fd = fds[name]
                if buf is None:
                    continue
                whole = n - n % 4096
                if whole:
                    os.pwrite(dfd, memoryview(buf)[:whole], off)
                if n > whole:  # the file's unaligned tail
                    os.pwrite(fd, memoryview(buf)[whole:n], off + whole)
                bufs.put(buf)
        except BaseException as e:  # noqa: BLE001 - reported by main
            errors.append(e)
        finally:
            for dfd, fd in fds.values():
                os.close(dfd)
                os.close(fd)

    threads = [threading.Thread(target=read, args=(a, True)), threading.Thread(target=read, args=(b, False)), threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- running a side ------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root to drop the page cache ({e}); run as root or pass --no-cold") from None


def warm(*dirs: Path) -> None:
    for d in dirs:
        for f in _files(d):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass


class Tree:
    """Peak RSS (summed) and storage I/O of a process and its descendants, sampled."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self.io: dict[int, tuple[int, int]] = {}  # pid -> (read_bytes, write_bytes), last seen

    def sample(self) -> None:
        total = 0
        for q in [self.root, *self.root.children(recursive=True)]:
            try:
                total += q.memory_info().rss
                io = q.io_counters()
                self.io[q.pid] = (io.read_bytes, io.write_bytes)
            except (psutil.Error, AttributeError):
                pass
        self.peak = max(self.peak, total)

    @property
    def read_bytes(self) -> int:
        return sum(r for r, _ in self.io.values())

    @property
    def write_bytes(self) -> int:
        return sum(w for _, w in self.io.values())


def parse_summary(text: str) -> dict:
    """mergeserve's summary: CPU-seconds by phase, read wait, workers' peak RSS, Ray actors' share."""
    got: dict = {}
    m = re.search(r"CPU-seconds by phase: (.*?) \(total", text)
    if m:
        got["phases"] = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)", m[1]) if k in PHASES}
    m = re.search(r"the merge waited ([0-9.]+) s for reads", text)
    if m:
        got["read_wait_s"] = float(m[1])
    workers = [float(x) for x in re.findall(r"peak memory: worker \S+ ([0-9.]+) GiB", text)]
    if workers:
        got["peak_worker_rss_gib"] = max(workers)
    wrote = re.search(r"wrote ([0-9.]+) GB", text)
    local = re.search(r"the driver merged \d+ \(([0-9.]+) GB\)", text)
    if wrote and local and float(wrote[1]):
        got["ray_actor_share"] = 1 - float(local[1]) / float(wrote[1])
    return got


@functools.cache
def compile_package() -> None:
    """Byte-compile mergeserve as a regular install does (mergekit's is, in site-packages; an
    editable install is not, and PYTHONDONTWRITEBYTECODE keeps it so): else every mergeserve run
    would pay ~0.5 s compiling its modules. The merge kernels get compiled by the first run."""
    import compileall

    compileall.compile_dir(str(REPO / "mergeserve"), quiet=1)


def run_sampled(cmd: list[str], env: dict | None = None) -> tuple[float, Tree, str]:
    """Run ``cmd`` to its end (HF_HUB_OFFLINE=1, plus ``env``), sampling its process tree every
    20 ms: (wall seconds, the Tree, stdout). A failed command ends the benchmark with its stderr."""
    compile_package()
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0", **(env or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tree = Tree(proc.pid)
    while proc.poll() is None:
        tree.sample()
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, tree, proc.stdout.read().decode(errors="replace")


def run_one(cmd: list[str], out: Path, side_env: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, tree, text = run_sampled(cmd, side_env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": wall, "peak_rss": tree.peak,
        "read_gb_s": tree.read_bytes / 1e9 / wall, "write_gb_s": tree.write_bytes / 1e9 / wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        **parse_summary(text),
    }


def output_digests(out: Path) -> dict[str, str]:
    """{tensor name: XXH3 of its bytes} of a checkpoint (to compare sides without keeping two)."""
    from mergeserve.merge.digest import digest_of
    from mergeserve.merge.reader import ModelFiles

    files = ModelFiles(out)
    try:
        return {name: digest_of(files.raw(name)) for name in files.tensors}
    finally:
        files.close()


# -- the report ----------------------------------------------------------------------------------
def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for side, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss", "read_gb_s", "write_gb_s", "cpu_s")}
        phases = [r["phases"] for r in rs if "phases" in r]
        if phases:
            med["phases"] = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in PHASES}
        for k in ("read_wait_s", "peak_worker_rss_gib", "ray_actor_share"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                med[k] = statistics.median(vals)
        out[side] = {"runs": rs, "median": med}
    return out


def table(res: dict) -> str:
    sides = res["sides"]
    peers = [s for s in MERGEKIT if s in sides]
    ref = min((sides[s]["median"] for s in peers), key=lambda m: m["wall_s"], default=None)
    floor = sides.get("io-floor", {}).get("median")
    how = "cold: page cache dropped before each side" if res["cold"] else "warm: inputs in the page cache"
    lines = [
        f"{res['shape']}, median of {res['rounds']}, {how}, {res['cpus']} CPUs. Speed-up against the faster mergekit side; "
        "CPU by phase: mergeserve's own accounting (read / merge math / quantize / hash / write).",
        "",
        "| side | wall s | vs mergekit | x I/O floor | peak tree RSS GiB | read GB/s | write GB/s | CPU s (tree) "
        "| CPU s by phase r / m / q / h / w | waited for reads s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s, d in sides.items():
        m = d["median"]
        sp = f"{ref['wall_s'] / m['wall_s']:.2f}x" if ref else "-"
        fl = f"{m['wall_s'] / floor['wall_s']:.2f}" if floor else "-"
        ph = " / ".join(f"{m['phases'][k]:.1f}" for k in PHASES) if "phases" in m else "-"
        rw = f"{m['read_wait_s']:.1f}" if "read_wait_s" in m else "-"
        lines.append(
            f"| {s} | {m['wall_s']:.2f} | {sp} | {fl} | {m['peak_rss'] / 2**30:.2f} | {m['read_gb_s']:.2f} | {m['write_gb_s']:.2f} "
            f"| {m['cpu_s']:.1f} | {ph} | {rw} |"
        )
    if res.get("equal_to_mergekit"):
        lines += ["", "Output equal to mergekit's, tensor by tensor: " + ", ".join(f"{s}: {v}" for s, v in res["equal_to_mergekit"].items())]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(res["sides"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, scale, label in ((ax1, "wall_s", 1, "wall time (s)"), (ax2, "peak_rss", 2**30, "peak RSS of process tree (GiB)")):
        vals = [res["sides"][s]["median"][key] / scale for s in sides]
        bars = ax.barh(sides, vals, color=["#888" if s == "io-floor" else "#d62" if s in MERGEKIT else "#27a" for s in sides])
        ax.bar_label(bars, fmt="%.2f", padding=3)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    how = "cold" if res["cold"] else "warm"
    fig.suptitle(f"merge of two {res['shape']}-shape bf16 models (slerp), {how}, median of {res['rounds']}, {res['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if sys.argv[1:2] == ["--floor"]:  # the io-floor side itself, as its own process
        floor_copy(*map(Path, sys.argv[2:5]), direct="--direct" in sys.argv[5:])
        return
    from mergeserve.synthetic import SHAPES, make_random_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma list of {ALL_SIDES}")
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                    help="drop the page cache before each side (default: on for mistral-7b, else warm)")
    ap.add_argument("--verify", action="store_true", help="check that each bf16 side's output equals mergekit's, tensor by tensor")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench"), help="where the input checkpoints are made (once) and kept")
    ap.add_argument("--scratch", help="where the recipe and each side's output go (default: --work)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where JSON/Markdown/PNG go")
    ap.add_argument("--cleanup", action="store_true", help="delete the generated input checkpoints afterwards")
    ap.add_argument("--tag", default="", help="suffix for the result files (merge-SHAPE[-TAG].json/md/png)")
    a = ap.parse_args()
    sides = a.sides.split(",")
    unknown = [s for s in sides if s not in ALL_SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}; known: {ALL_SIDES}")
    cold = a.shape == "mistral-7b" if a.cold is None else a.cold
    work = Path(a.work)
    scratch = Path(a.scratch or a.work)
    scratch.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[a.shape]
    ma, mb = work / f"{a.shape}-a", work / f"{a.shape}-b"
    for d, seed in ((ma, 1), (mb, 2)):
        if not (d / "model.safetensors.index.json").exists():
            print(f"making {d} (random bf16, {a.shape})", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            make_random_model(d, shape, seed=seed, noise_of=ma if d == mb else None)
    cfg = scratch / f"bench-{a.shape}-slerp.yaml"
    cfg.write_text(yaml.safe_dump(recipe(ma, mb, shape.layers)))
    out = scratch / "bench-out"
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    digests: dict[str, dict[str, str]] = {}
    for r in range(a.rounds):
        for s in sides:
            if cold:
                drop_caches()
            else:
                warm(ma, mb)
            res = run_one(command(s, cfg, ma, mb, out, cold), out, SIDE_ENV.get(s))
            if a.verify and r == 0 and s != "io-floor" and s != "mergeserve-fp8":
                digests[s] = output_digests(out)
            shutil.rmtree(out, ignore_errors=True)
            runs[s].append(res)
            ph = " ".join(f"{k} {v:.1f}" for k, v in res.get("phases", {}).items())
            print(
                f"round {r + 1}/{a.rounds} {s:18s} {res['wall_s']:7.2f} s  peak tree RSS {res['peak_rss'] / 2**30:5.2f} GiB  "
                f"read {res['read_gb_s']:5.2f} GB/s  write {res['write_gb_s']:5.2f} GB/s  CPU {res['cpu_s']:6.1f} s  {ph}",
                flush=True,
            )
    res = {"shape": a.shape, "rounds": a.rounds, "cold": cold, "cpus": os.cpu_count(), "sides": summarize(runs)}
    ref_side = next((s for s in (MERGEKIT_REFERENCE, *MERGEKIT) if s in digests), None)
    if ref_side is not None:
        ref = digests[ref_side]
        res["equal_to_mergekit"] = {"reference": ref_side} | {
            s: "equal" if d == ref else f"{sum(d.get(k) != v for k, v in ref.items())} of {len(ref)} tensors differ"
            for s, d in digests.items() if s != ref_side
        }
    text = table(res)
    print(text)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"merge-{a.shape}" + (f"-{a.tag}" if a.tag else "")
    (outdir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (outdir / f"{stem}.md").write_text(text + "\n")
    plot(res, outdir / f"{stem}.png")
    cfg.unlink(missing_ok=True)
    if a.cleanup:
        shutil.rmtree(ma, ignore_errors=True)
        shutil.rmtree(mb, ignore_errors=True)


if __name__ == "__main__":
    main()
