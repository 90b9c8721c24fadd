"""``mergeserve loadtest``: registered into the main CLI by ``mergeserve.cli``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from mergeserve.errors import ConfigError


def _list(kind):
    """``4`` or ``1,4,16`` (a sweep) -> a value or a list of values."""
    def parse(text: str):
        try:
            vals = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a value, got {text!r}")
        return vals[0] if len(vals) == 1 else vals
    parse.__name__ = kind.__name__
    return parse


def _rate(v: str) -> float:
    return math.inf if v.strip().lower() == "inf" else float(v)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="load-test an OpenAI-compatible endpoint; several models side by side",
                       description="Stream requests to an OpenAI-compatible endpoint and report TTFT, ITL, TPOT and "
                                   "end-to-end latency (mean/p50/p90/p99), throughput, goodput and errors per model.")
    p.add_argument("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000 (traffic goes only here)")
    p.add_argument("--model", action="append", dest="models", default=[], help="model name (repeat for side by side)")
    p.add_argument("--models-file", help="file of model names: one per line ('#' comments), or a YAML/JSON list of "
                                         "names or {model, tokenizer} entries")
    p.add_argument("--api-key", default=os.environ.get("MERGESERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $MERGESERVE_API_KEY, then $OPENAI_API_KEY)")
    load = p.add_argument_group("load (a comma-separated list sweeps)")
    load.add_argument("--concurrency", type=_list(int), help="requests in flight (default 8); with --rate: a cap")
    load.add_argument("--rate", type=_list(_rate), help="requests/s, constant unless --poisson ('inf': all at once)")
    load.add_argument("--poisson", action="store_true", help="Poisson arrivals at --rate (Gamma with --burstiness)")
    load.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape for --poisson: <1 burstier, >1 steadier (default 1)")
    load.add_argument("--requests", type=int, help="measured requests per model and load point (default 100 without --duration)")
    load.add_argument("--duration", type=float, help="seconds of sending per model and load point")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each run (default 2)")
    load.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    work = p.add_argument_group("workload")
    work.add_argument("--input-len", type=int, default=256, help="synthetic prompt tokens, specials included (default 256)")
    work.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default 128)")
    work.add_argument("--prompts", dest="prompts_file", help='JSONL of {"prompt": ..., "output_len": N} instead of synthetic prompts')
    work.add_argument("--tokenizer", action="append", help="local tokenizer/checkpoint dir for synthetic prompts: once for all "
                                                           "models or once per --model (default: the server's model root)")
    work.add_argument("--api", choices=["completions", "chat"], default="completions", help="which endpoint (default completions)")
    work.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos (non-vLLM servers)")
    work.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", help="goodput objectives in ms, e.g. ttft=500,tpot=50[,e2e=5000]")
    p.add_argument("--out", help="write loadtest.json, loadtest.csv, requests.csv and PNG plots here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_loadtest)


def read_models_file(path: str) -> tuple[list[str], dict[str, str]]:
    """Model names (and tokenizers by model, where given) from a --models-file."""
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"--models-file {f}: no such file")
    text = f.read_text(encoding="utf-8")
    if f.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--models-file {f}: not YAML/JSON ({str(e).splitlines()[0]})") from None
    else:
        items = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        items = [i for i in items if i]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--models-file {f}: expected a non-empty list of models")
    names, toks, problems = [], {}, []
    for i, it in enumerate(items, 1):
        if isinstance(it, str) and it:
            names.append(it)
        elif isinstance(it, dict) and isinstance(it.get("model"), str) and set(it) <= {"model", "tokenizer"}:
            names.append(it["model"])
            if it.get("tokenizer"):
                toks[it["model"]] = str(it["tokenizer"])
        else:
            problems.append(f"entry {i}: expected a name or {{model: NAME, tokenizer: DIR}}, got {it!r}")
    if problems:
        raise ConfigError.from_problems(problems, f"--models-file {f}")
    return names, toks


def _cmd_loadtest(a: argparse.Namespace) -> int:
    from mergeserve.loadtest import run_loadtest

    models, tokenizer = list(a.models), a.tokenizer
    if a.models_file:
        names, toks = read_models_file(a.models_file)
        models += names
        if toks:
            if tokenizer and len(tokenizer) > 1:
                raise ConfigError("--tokenizer: give one for all models when --models-file names tokenizers")
            tokenizer = {m: toks.get(m, tokenizer[0] if tokenizer else None) for m in models}
    if isinstance(tokenizer, list) and len(tokenizer) == 1:
        tokenizer = tokenizer[0]
    report = run_loadtest(
        a.url, models, api_key=a.api_key, concurrency=a.concurrency, rate=a.rate, poisson=a.poisson,
        burstiness=a.burstiness, requests=a.requests, duration=a.duration, input_len=a.input_len,
        output_len=a.output_len, prompts_file=a.prompts_file, tokenizer=tokenizer, api=a.api,
        ignore_eos=a.ignore_eos, warmup=a.warmup, seed=a.seed, slo=a.slo, out_dir=a.out, timeout=a.timeout,
        progress=not a.quiet,
    )
    print(report.table(), end="")
    for kind, path in report.files.items():
        print(f"wrote {kind}: {path}")
    if report.interrupted:
        print("mergeserve: interrupted; partial results kept", file=sys.stderr)
        return 130
    return 0
