"""Serving benchmark: `mergeserve serve` (Ray Serve + vLLM) against vLLM's own OpenAI server,
same checkpoint, same load, one after the other in one run.

    .venv/bin/python benchmarks/serve_bench.py CHECKPOINT [--rounds 3] [--concurrency 16] [--requests 64] [--max-tokens 64]
        [--sides vllm,mergeserve,ray-proxy,ray-haproxy,ray-haproxy-direct,mergeserve-fp8,...]
        [--fp8-checkpoint FP8_CHECKPOINT] [--tag NAME]

Sides: vLLM's own server (the peer), `mergeserve serve`, and Ray Serve's own request paths
(benchmarks/ray_serve_variants.py). Each round starts each server in turn (rotating the order,
so that drift on a shared machine hits every side),
timing start-up to the first successful request, warms it, then runs the load: ``--requests``
streamed completions, ``--concurrency`` at a time, each generating exactly ``--max-tokens``
tokens (ignore_eos). Measured per round: output tokens/s, p50/p90 time to first token, peak RSS
of the server's process tree, and the CPU time each kind of process in that tree used during the
load (engine worker, engine core, HTTP front end(s)), per request; then, without load, the p50
time to first token of ``--single-requests`` requests sent one at a time. Reports medians over rounds
and the ratios mergeserve / vLLM. Writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import psutil

from mergeserve.serve.process import stop_process_tree

REPO = Path(__file__).resolve().parents[1]
DIRECT_INGRESS_PORTS = (30000, 31000)  # Ray Serve's defaults (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssWatch(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, i: int) -> tuple[float, int, float]:
    body = {"model": model, "prompt": f"def function_{i}(x):", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    return ttft or float("nan"), tokens, time.perf_counter() - t0


async def load(url: str, model: str, n: int, conc: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conc * 2)) as client:
        async def run(i):
            async with sem:
                return await one(client, url, model, max_tokens, i)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res)
    toks = sum(r[1] for r in res)
    return {"output_tok_s": toks / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))], "tokens": toks, "wall_s": wall}


def role(p: psutil.Process) -> str:
    """Which part of a server a process is (by its title), for the CPU accounting."""
    try:
        title = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    for key, name in (("VLLM::Worker", "engine worker"), ("VLLM::EngineCore", "engine core"),
                      ("ProxyActor", "Serve HTTP proxy"), ("OpenAiIngress", "Serve OpenAI ingress"),
                      ("LLMServer", "Serve LLMServer replica"), ("LLMRouter", "Serve LLM router"), ("haproxy", "HAProxy"),
                      ("HAProxyManager", "Serve HAProxy manager"), ("vllm.entrypoints.openai.api_server", "vLLM API server")):
        if key in title:
            return name
    return "other (Ray's GCS, raylet, controller, agents; driver)"


def cpu_by_process(pid: int) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} for ``pid`` and its descendants."""
    out: dict[int, tuple[str, float]] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (role(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used between two snapshots, process by process (a process started
    in between, e.g. a reloaded HAProxy, counts from zero)."""
    out: dict[str, float] = {}
    for pid, (r, cpu) in after.items():
        out[r] = out.get(r, 0.0) + cpu - before.get(pid, (r, 0.0))[1]
    return out


def start(cmd: list[str], url: str, model: str, timeout: float = 1800, kv_cache_gib: int = 1) -> tuple[subprocess.Popen, float, RssWatch]:
    """Start a server; returns (process, seconds to its first answered request, its RSS watch).
    ``kv_cache_gib``: the KV cache of vLLM's own server (mergeserve sets its own, --kv-cache-gib)."""
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    watch = RssWatch(proc.pid)
    watch.start()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1}, timeout=300)
            if r.status_code == 200:
                return proc, time.perf_counter() - t0, watch
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_process_tree(proc)
    raise SystemExit(f"{cmd[:4]} not ready after {timeout:.0f} s")


def replica_url(pid: int, model: str) -> str | None:
    """The model's replica's own HTTP port (Ray's direct ingress, behind HAProxy), if it has one."""
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "ServeReplica" not in " ".join(p.cmdline()):
                continue
            for c in p.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and DIRECT_INGRESS_PORTS[0] <= c.laddr.port < DIRECT_INGRESS_PORTS[1]:
                    return f"http://127.0.0.1:{c.laddr.port}/_m/{model}"
        except psutil.Error:
            pass
    return None


def run_side(cmd: list[str], name: str, a: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, startup, watch = start(cmd(port), url, name)
    try:
        # warm-up with the measured load's shape: batch sizes the engine has not run yet compile on first use
        asyncio.run(load(url, name, 2 * a.concurrency, a.concurrency, a.max_tokens))
        before = cpu_by_process(proc.pid)
        r = asyncio.run(load(url, name, a.requests, a.concurrency, a.max_tokens))
        after = cpu_by_process(proc.pid)
        single = asyncio.run(load(url, name, a.single_requests, 1, a.max_tokens))  # one request at a time
        direct = replica_url(proc.pid, name)
        if direct:  # the same load straight to the replica: what HAProxy's hop costs
            r["replica_port"] = asyncio.run(load(direct, name, a.requests, a.concurrency, a.max_tokens))
            r["replica_port"]["single_ttft_p50_ms"] = asyncio.run(load(direct, name, a.single_requests, 1, a.max_tokens))["ttft_p50_ms"]
    finally:
        watch.done.set()
        stop_process_tree(proc)
    cpu = cpu_by_role(before, after)
    r.update(startup_s=startup, peak_rss_gib=watch.peak / 2**30, single_ttft_p50_ms=single["ttft_p50_ms"],
             cpu_ms_per_request={k: 1000 * v / a.requests for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])})
    return r


def median_of(rounds: list[dict]) -> dict:
    keys = ("output_tok_s", "ttft_p50_ms", "ttft_p90_ms", "single_ttft_p50_ms", "startup_s", "peak_rss_gib")
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    roles = {k for r in rounds for k in r["cpu_ms_per_request"]}
    med["cpu_ms_per_request"] = dict(sorted(((k, statistics.median(r["cpu_ms_per_request"].get(k, 0.0) for r in rounds)) for k in roles),
                                            key=lambda kv: -kv[1]))
    return med


def ray_variant(script: str, checkpoint: str, name: str, mode: str, port: int) -> list[str]:
    return [sys.executable, script, checkpoint, "--port", str(port), "--name", name, "--mode", mode]


def mergeserve_fp8(checkpoint: str, name: str, extra: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "mergeserve.cli", "serve", checkpoint, "--name", name, "--port", str(port),
            "--metrics-port", str(free_port()), *extra]


def side_commands(a: argparse.Namespace, name: str) -> dict:
    """Each side's command line, given a free port."""
    here = str(REPO / "benchmarks" / "ray_serve_variants.py")
    known = {
        "vllm": lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.checkpoint,
                              "--served-model-name", name, "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port)],
        "mergeserve": lambda port: [sys.executable, "-m", "mergeserve.cli", "serve", a.checkpoint, "--name", name,
                                    "--port", str(port), "--metrics-port", str(free_port()), *a.serve_args.split()],
        **{f"ray-{mode}": partial(ray_variant, here, a.checkpoint, name, mode) for mode in ("proxy", "haproxy", "haproxy-direct")},
    }
    if a.fp8_checkpoint:  # the same merge written as block FP8, behind mergeserve serve
        for side, args in (("mergeserve-fp8", ["--fp8-kernel", "auto"]), ("mergeserve-fp8-plugin", ["--fp8-kernel", "mergeserve"]),
                           ("mergeserve-fp8-plugin-fp8", ["--fp8-kernel", "mergeserve", "--fp8-weights", "fp8"])):
            known[side] = partial(mergeserve_fp8, a.fp8_checkpoint, name, [*args, *a.serve_args.split()])
    unknown = [s for s in a.sides if s not in known]
    if unknown or "vllm" not in a.sides:
        raise SystemExit(f"--sides: vllm (the peer) and any of {', '.join(known)}; unknown: {unknown}")
    return {s: known[s] for s in a.sides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each starts every server); medians are reported")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single-requests", type=int, default=16, help="then this many requests one at a time, for TTFT without load")
    ap.add_argument("--sides", type=lambda v: v.split(","), default=["vllm", "mergeserve"],
                    help="comma-separated: vllm (the peer), mergeserve, ray-proxy, ray-haproxy, ray-haproxy-direct; with "
                         "--fp8-checkpoint also mergeserve-fp8 (vLLM's kernel choice), mergeserve-fp8-plugin (mergeserve's, "
                         "weights dequantized to bf16 at load) and mergeserve-fp8-plugin-fp8 (mergeserve's, weights kept FP8)")
    ap.add_argument("--fp8-checkpoint", help="the same merge written with --out-dtype fp8, for the FP8 sides")
    ap.add_argument("--tag", default="", help="suffix of the result files (serve-TAG.json)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--serve-args", default="", help="extra arguments for mergeserve serve, e.g. --no-engine-metrics")
    a = ap.parse_args()
    name = "bench-model"
    sides = side_commands(a, name)
    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(a.rounds):
        order = list(sides.items())
        order = order[i % len(order):] + order[: i % len(order)]  # rotate, so that drift hits every side
        for side, cmd in order:
            r = run_side(cmd, name, a)
            rounds[side].append(r)
            print(f"round {i + 1} {side:20s} start {r['startup_s']:6.1f} s  {r['output_tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                  f"p90 {r['ttft_p90_ms']:7.1f} ms  1-stream TTFT p50 {r['single_ttft_p50_ms']:6.1f} ms  peak RSS {r['peak_rss_gib']:.2f} GiB"
                  f"  CPU ms/request {json.dumps({k: round(v, 1) for k, v in r['cpu_ms_per_request'].items()})}", flush=True)
            if "replica_port" in r:
                d = r["replica_port"]
                print(f"        {side} straight to its replica's port: {d['output_tok_s']:8.1f} tok/s  TTFT p50 {d['ttft_p50_ms']:7.1f} ms  "
                      f"1-stream TTFT p50 {d['single_ttft_p50_ms']:6.1f} ms", flush=True)
    results = {side: median_of(rs) for side, rs in rounds.items()}
    peer = rounds["vllm"]
    summary = {}
    for side, rs in rounds.items():
        if side == "vllm":
            continue
        summary[side] = {
            "tok_s_ratio_median": statistics.median(m["output_tok_s"] / v["output_tok_s"] for v, m in zip(peer, rs)),
            "tok_s_ratio_per_round": [m["output_tok_s"] / v["output_tok_s"] for v, m in zip(peer, rs)],
            "ttft_p50_delta_ms_median": statistics.median(m["ttft_p50_ms"] - v["ttft_p50_ms"] for v, m in zip(peer, rs)),
            "single_ttft_delta_ms_median": statistics.median(m["single_ttft_p50_ms"] - v["single_ttft_p50_ms"] for v, m in zip(peer, rs)),
            "startup_ratio_median": statistics.median(m["startup_s"] / v["startup_s"] for v, m in zip(peer, rs)),
        }
    hops = {side: {k: statistics.median(r["replica_port"][k] for r in rs) for k in ("output_tok_s", "ttft_p50_ms", "single_ttft_p50_ms")}
            for side, rs in rounds.items() if all("replica_port" in r for r in rs)}
    roles = list(dict.fromkeys(k for r in results.values() for k in r["cpu_ms_per_request"]))
    table = "\n".join([
        f"| server ({a.concurrency} concurrent streams, {a.requests} x {a.max_tokens} tokens; median of {a.rounds} rotating rounds) "
        "| output tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p50 ms, 1 stream | start-up s | peak RSS GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['single_ttft_p50_ms']:.1f} "
          f"| {r['startup_s']:.1f} | {r['peak_rss_gib']:.2f} |" for k, r in results.items()),
        "",
        "| side / vLLM (median of per-round ratios and differences) | tok/s | TTFT p50 | TTFT p50, 1 stream | start-up |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {v['tok_s_ratio_median']:.1%} | {v['ttft_p50_delta_ms_median']:+.1f} ms | {v['single_ttft_delta_ms_median']:+.1f} ms "
          f"| {v['startup_ratio_median']:.2f}x |" for k, v in summary.items()),
        "",
        *([
            "The same loads sent straight to the replica's own port (Ray's direct ingress), past HAProxy (medians):",
            "",
            "| side | output tok/s | TTFT p50 ms | TTFT p50 ms, 1 stream |",
            "| --- | ---: | ---: | ---: |",
            *(f"| {k}, replica port | {h['output_tok_s']:.1f} | {h['ttft_p50_ms']:.1f} | {h['single_ttft_p50_ms']:.1f} |" for k, h in hops.items()),
            "",
        ] if hops else []),
        "CPU time used during the load, per request (ms; median over rounds):",
        "",
        "| process | " + " | ".join(results) + " |",
        "| --- |" + " ---: |" * len(results),
        *(f"| {k} | " + " | ".join(f"{r['cpu_ms_per_request'].get(k, 0.0):.1f}" for r in results.values()) + " |" for k in roles),
        "| total | " + " | ".join(f"{sum(r['cpu_ms_per_request'].values()):.1f}" for r in results.values()) + " |",
    ])
    print(table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{a.tag}" if a.tag else "serve"
    doc = {"settings": {"checkpoint": a.checkpoint, "concurrency": a.concurrency, "requests": a.requests, "max_tokens": a.max_tokens,
                        "rounds": a.rounds, "sides": a.sides, "serve_args": a.serve_args},
           "median": results, "replica_port": hops, "summary": summary, "rounds": rounds}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
