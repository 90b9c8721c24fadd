"""Load testing of OpenAI-compatible endpoints: ``mergeserve loadtest`` and its Python API.

Drives any OpenAI-compatible endpoint (``mergeserve serve``, vLLM, ...) with streamed requests
and reports, per model, the metrics vLLM's benchmark client and GuideLLM report: TTFT, ITL, TPOT
and end-to-end latency (mean, p50, p90, p99), request throughput, output tokens/s, goodput under
SLOs, and errors by kind (definitions: :mod:`mergeserve.loadtest.metrics`). Several models get
the same workload with the same seeds and are reported side by side.

Load modes: fixed concurrency; constant rate; Poisson rate with burstiness; a sweep over rates or
concurrencies (give a list). Each (model, load point) run starts with a warm-up and is bounded by a
request count and/or a duration. Prompts are synthetic (exact input length, counted with the served
model's own tokenizer) or read from a JSONL file. Token counts come from the server's usage report.

Python API (used by the sweep command to load-test the variants it serves)::

    from mergeserve.loadtest import run_loadtest

    report = run_loadtest(
        "http://127.0.0.1:8000", ["variant-a", "variant-b"], api_key="...",
        concurrency=8,                 # or rate=4.0 (poisson=True, burstiness=1.0); a list sweeps
        requests=64,                   # and/or duration=60.0 (seconds)
        input_len=256, output_len=128, # synthetic prompts (or prompts_file="prompts.jsonl")
        tokenizer={"variant-a": "out/a", "variant-b": "out/b"},  # checkpoint dirs, or one for all
        warmup=2, seed=0, slo="ttft=500,tpot=50", timeout=300.0,
        out_dir="runs/loadtest",       # writes loadtest.json/.csv, requests.csv, *.png
        progress=True,
    )
    print(report.table())
    report.metrics("variant-a").output_throughput   # -> Metrics (see metrics.py)
    report.to_json()

From async code, await ``mergeserve.loadtest.runner.run_async(make_options(url, models, ...))``
instead (``run_loadtest`` starts its own event loop).

Errors: bad options raise ``ConfigError`` (every problem at once) and a missing tokenizer or
prompts file ``InputError``, before any request; an endpoint that cannot be reached, refuses the
API key or does not list a model raises ``EndpointError`` (exit code 5) after one ``/v1/models``
call. Failures during the run are never raised: they are counted by kind in the report.
"""

from __future__ import annotations

from pathlib import Path

from mergeserve.loadtest.metrics import SLO, Metrics, RequestRecord
from mergeserve.loadtest.report import LoadPoint, LoadTestReport, RunResult

__all__ = ["run_loadtest", "LoadTestReport", "RunResult", "LoadPoint", "Metrics", "RequestRecord", "SLO"]


def run_loadtest(url: str, models: list[str] | str, *, api_key: str | None = None,
                 concurrency: int | list[int] | None = None, rate: float | list[float] | None = None,
                 poisson: bool = False, burstiness: float = 1.0, requests: int | None = None,
                 duration: float | None = None, input_len: int = 256, output_len: int = 128,
                 prompts_file: str | Path | None = None, tokenizer: str | Path | list | dict | None = None,
                 api: str = "completions", ignore_eos: bool = True, warmup: int = 2, seed: int = 0,
                 slo: str | dict | SLO | None = None, out_dir: str | Path | None = None, timeout: float = 300.0,
                 progress: bool = True) -> LoadTestReport:
    """Load-test ``models`` at ``url``; returns the report (and writes its files when ``out_dir``).

    ``concurrency`` alone: closed loop with that many requests in flight (default 8). ``rate``:
    open loop at that many requests/s, constant or ``poisson`` (Gamma gaps with ``burstiness``),
    with ``concurrency`` as an optional cap. A list of rates or concurrencies is a sweep. Without
    ``requests`` or ``duration``, 100 requests per model and load point. ``tokenizer``: the local
    directory of the served model's tokenizer (one for all, a list in model order, or a dict by
    model); by default the ``root`` that ``/v1/models`` reports, or the model name, if it is a
    local directory. ``ignore_eos`` asks vLLM-style servers to generate exactly ``output_len``
    tokens. Every request times out after ``timeout`` seconds. Interrupted (Ctrl-C in the main
    thread): returns the partial results with ``report.interrupted`` set.
    """
    from mergeserve.loadtest.runner import make_options, run

    opts = make_options(url, models, api_key=api_key, concurrency=concurrency, rate=rate, poisson=poisson,
                        burstiness=burstiness, requests=requests, duration=duration, input_len=input_len,
                        output_len=output_len, prompts_file=prompts_file, tokenizer=tokenizer, api=api,
                        ignore_eos=ignore_eos, warmup=warmup, seed=seed, slo=slo, timeout=timeout)
    report = run(opts, progress=progress)
    if out_dir is not None:
        report.files = report.write(out_dir)
    return report
