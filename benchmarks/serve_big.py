"""The mission's model served here: a 7B FP8 merge behind `mergeserve serve` and behind vLLM's own
OpenAI server, one after the other, with a 4096-token context.

    .venv/bin/python benchmarks/serve_big.py CHECKPOINT [--requests 4] [--max-tokens 16] [--long-prompt 4000]

For each server: start-up time (to the first answered request), peak RSS of its process tree,
output tokens/s with 1 stream and with 4 at a time (``--requests`` requests of ``--max-tokens``
tokens each, ignore_eos), and one prompt of ``--long-prompt`` tokens (by the checkpoint's own
tokenizer) answered, with its time to first token. Ratios mergeserve / vLLM in the same run. A
7B model decodes at a few tokens per second on 2 cores, so the loads are small. Writes
benchmarks/results/serve-big[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import REPO, free_port, load, start  # noqa: E402

from mergeserve.serve.process import stop_process_tree  # noqa: E402


def long_prompt(checkpoint: str, tokens: int) -> str:
    """Text of exactly about ``tokens`` tokens by the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    words = ("def merge(models, weights):\n    return sum(w * m for w, m in zip(weights, models))\n" * 2000).split(" ")
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
    return tok.decode(ids)


def run_side(name: str, cmd, a: argparse.Namespace, prompt: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, startup, watch = start(cmd(port), url, "big", timeout=a.start_timeout, kv_cache_gib=a.kv_cache_gib)
    out: dict = {"startup_s": startup}
    try:
        for conc in (1, 4):
            r = asyncio.run(load(url, "big", a.requests if conc > 1 else max(1, a.requests // 2), conc, a.max_tokens))
            out[f"tok_s_{conc}"] = r["output_tok_s"]
            out[f"ttft_p50_ms_{conc}"] = r["ttft_p50_ms"]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", timeout=3600,
                       json={"model": "big", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        out["long_prompt"] = {"status": r.status_code, "seconds": time.perf_counter() - t0,
                              "prompt_tokens": r.json().get("usage", {}).get("prompt_tokens") if r.status_code == 200 else None,
                              "text": r.json()["choices"][0]["text"] if r.status_code == 200 else r.text[:300]}
    finally:
        watch.done.set()
        out["peak_rss_gib"] = watch.peak / 2**30
        stop_process_tree(proc)
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--long-prompt", type=int, default=4000)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--serve-args", default="", help="extra arguments for mergeserve serve")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    prompt = long_prompt(a.checkpoint, a.long_prompt)
    sides = {
        "vllm": lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.checkpoint,
                              "--served-model-name", "big", "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port)],
        "mergeserve": lambda port: [sys.executable, "-m", "mergeserve.cli", "serve", a.checkpoint, "--name", "big", "--port", str(port),
                                    "--metrics-port", str(free_port()), "--kv-cache-gib", str(a.kv_cache_gib), *a.serve_args.split()],
    }
    results = {name: run_side(name, cmd, a, prompt) for name, cmd in sides.items()}
    v, m = results["vllm"], results["mergeserve"]
    ratios = {k: m[k] / v[k] for k in ("tok_s_1", "tok_s_4", "startup_s", "peak_rss_gib")}
    rows = [
        "| server | start-up s | peak RSS GiB | tok/s, 1 stream | tok/s, 4 streams | TTFT p50 ms, 4 streams | 4k-token prompt: s (tokens) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {r['startup_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['tok_s_1']:.2f} | {r['tok_s_4']:.2f} | {r['ttft_p50_ms_4']:.0f} "
          f"| {r['long_prompt']['seconds']:.1f} ({r['long_prompt']['prompt_tokens']}) |" for k, r in results.items()),
        f"| mergeserve / vLLM | {ratios['startup_s']:.2f}x | {ratios['peak_rss_gib']:.2f}x | {ratios['tok_s_1']:.1%} | {ratios['tok_s_4']:.1%} | | |",
    ]
    table = "\n".join(rows)
    print(table)
    out = Path(a.out)
    stem = "serve-big" + (f"-{a.tag}" if a.tag else "")
    doc = {"checkpoint": a.checkpoint, "settings": vars(a), "results": results, "ratios": ratios}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
