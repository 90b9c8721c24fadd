"""Drive the load: validate the options, check the endpoint, then for every load point and every
model a warm-up and a measured run, with the same prompts and the same arrival seeds per model.

Load points interleave the models (point 1: model a, model b; point 2: a, b; ...) so slow drift of
the machine affects every model alike. Ctrl-C (SIGINT) stops sending, cancels what is in flight
and returns the partial results (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mergeserve.errors import ConfigError, InputError
from mergeserve.loadtest import client as http
from mergeserve.loadtest.metrics import SLO, RequestRecord, parse_slo, summarize
from mergeserve.loadtest.report import LoadPoint, LoadTestReport, RunResult
from mergeserve.loadtest.workload import Prompt, arrival_offsets, jsonl_prompts, load_tokenizer, pick, synthetic_prompts

DEFAULT_CONCURRENCY = 8
DEFAULT_REQUESTS = 100
DURATION_POOL = 256  # prompts generated for a duration-bounded run (cycled)


@dataclass(frozen=True)
class Options:
    """A load test's validated options (see :func:`make_options`)."""

    url: str
    models: list[str]
    points: list[LoadPoint]
    requests: int | None
    duration: float | None
    poisson: bool
    burstiness: float
    input_len: int
    output_len: int
    prompts_file: str | None
    tokenizers: dict[str, str | None]
    api: str
    ignore_eos: bool
    warmup: int
    seed: int
    slo: SLO | None
    timeout: float
    api_key: str | None

    def describe(self) -> dict:
        return {
            "url": self.url, "models": self.models, "points": [p.label for p in self.points], "requests": self.requests,
            "duration_s": self.duration, "poisson": self.poisson, "burstiness": self.burstiness,
            "input_len": None if self.prompts_file else self.input_len, "output_len": self.output_len,
            "prompts_file": self.prompts_file, "api": self.api, "ignore_eos": self.ignore_eos, "warmup": self.warmup,
            "seed": self.seed, "slo": self.slo.describe() if self.slo else None, "timeout_s": self.timeout,
        }


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def make_options(url, models, *, api_key=None, concurrency=None, rate=None, poisson=False, burstiness=1.0, requests=None,
                 duration=None, input_len=256, output_len=128, prompts_file=None, tokenizer=None, api="completions",
                 ignore_eos=True, warmup=2, seed=0, slo=None, timeout=300.0) -> Options:
    """Check every option; all problems are reported at once (ConfigError) before any request."""
    problems = []
    url = str(url or "").rstrip("/")
    url = url[:-3] if url.endswith("/v1") else url
    if not url.startswith(("http://", "https://")):
        problems.append(f"--url: expected http://host:port, got {url!r}")
    models = [str(m) for m in _as_list(models)]
    if not models:
        problems.append("--model: give at least one model name")
    if len(set(models)) != len(models):
        problems.append(f"--model: names repeat: {models}")
    concs, rates = _as_list(concurrency), _as_list(rate)
    problems += _load_problems(concs, rates, poisson, burstiness, requests, duration)
    problems += _request_problems(input_len, output_len, warmup, timeout, api)
    tokenizers = _tokenizers(models, tokenizer, problems)
    if prompts_file is not None and not Path(prompts_file).is_file():
        problems.append(f"--prompts {prompts_file}: no such file")
    try:
        slo = parse_slo(slo)
    except ConfigError as e:
        problems.extend(e.problems)
        slo = None
    if problems:
        raise ConfigError.from_problems(problems, "loadtest")
    if requests is None and duration is None:
        requests = DEFAULT_REQUESTS
    return Options(
        url=url, models=models, points=_points(concs, rates), requests=requests,
        duration=None if duration is None else float(duration), poisson=bool(poisson), burstiness=float(burstiness),
        input_len=input_len, output_len=output_len, prompts_file=None if prompts_file is None else str(prompts_file),
        tokenizers=tokenizers, api=api, ignore_eos=bool(ignore_eos), warmup=warmup, seed=int(seed), slo=slo,
        timeout=float(timeout), api_key=api_key,
    )


def _load_problems(concs: list, rates: list, poisson, burstiness, requests, duration) -> list[str]:
    """What is wrong with the load: concurrency, rate, arrivals, and how long a run lasts."""
    problems = []
    for c in concs:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            problems.append(f"--concurrency: expected positive integers, got {c!r}")
    for r in rates:
        if not isinstance(r, (int, float)) or not r > 0:
            problems.append(f"--rate: expected positive requests/s (or inf), got {r!r}")
    if len(concs) > 1 and len(rates) > 1:
        problems.append("sweep either --rate or --concurrency, not both (a single --concurrency caps a rate sweep)")
    if rates and len(concs) > 1:
        problems.append("with --rate, --concurrency is one cap on requests in flight, not a list")
    if poisson and not rates:
        problems.append("--poisson needs --rate")
    if any(isinstance(r, (int, float)) and math.isinf(r) for r in rates) and requests is None and not concs:
        problems.append("--rate inf sends everything at once: bound it with --requests or a --concurrency cap")
    if not (isinstance(burstiness, (int, float)) and 0 < burstiness < math.inf):
        problems.append(f"--burstiness: expected a positive number, got {burstiness!r}")
    if burstiness != 1.0 and not poisson:
        problems.append("--burstiness applies to --poisson arrivals only")
    if requests is not None and (not isinstance(requests, int) or requests < 1):
        problems.append(f"--requests: expected a positive integer, got {requests!r}")
    if duration is not None and not (isinstance(duration, (int, float)) and 0 < duration < math.inf):
        problems.append(f"--duration: expected positive seconds, got {duration!r}")
    return problems


def _request_problems(input_len, output_len, warmup, timeout, api) -> list[str]:
    """What is wrong with each request: lengths, warm-up count, timeout, endpoint."""
    problems = []
    for name, v, lo in (("--input-len", input_len, 1), ("--output-len", output_len, 1), ("--warmup", warmup, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            problems.append(f"{name}: expected an integer >= {lo}, got {v!r}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        problems.append(f"--timeout: expected positive seconds, got {timeout!r}")
    if api not in ("completions", "chat"):
        problems.append(f"--api: expected completions or chat, got {api!r}")
    return problems


def _points(concs: list, rates: list) -> list[LoadPoint]:
    """The load points: one per rate (a single concurrency caps them all), else one per concurrency."""
    if rates:
        cap = concs[0] if concs else None
        return [LoadPoint("rate", float(r), cap) for r in rates]
    return [LoadPoint("concurrency", c) for c in (concs or [DEFAULT_CONCURRENCY])]


def _tokenizers(models: list[str], tokenizer, problems: list[str]) -> dict[str, str | None]:
    """One tokenizer directory for all models, one per model (list in order, or dict), or none."""
    if isinstance(tokenizer, dict):
        extra = sorted(set(tokenizer) - set(models))
        if extra:
            problems.append(f"--tokenizer: for models not in the run: {extra}")
        for t in tokenizer.values():
            if t is not None and not Path(str(t)).is_dir():
                problems.append(f"--tokenizer {t}: not a directory (give the served model's checkpoint directory)")
        return {m: None if tokenizer.get(m) is None else str(tokenizer[m]) for m in models}
    toks = _as_list(tokenizer)
    for t in toks:
        if t is not None and not Path(str(t)).is_dir():
            problems.append(f"--tokenizer {t}: not a directory (give the served model's checkpoint directory)")
    if len(toks) > 1 and len(toks) != len(models):
        problems.append(f"--tokenizer: give one for all models or one per model ({len(models)}), got {len(toks)}")
        return {m: None for m in models}
    return {m: str(toks[i] if len(toks) > 1 else toks[0]) if toks else None for i, m in enumerate(models)}


def _workload(o: Options, model: str, listed: dict, cache: dict) -> tuple[list[Prompt], list[Prompt]]:
    """The run's (measured, warm-up) prompts for ``model``: identical for models sharing a tokenizer.

    Warm-up prompts are distinct from the measured ones (where there are enough), so a server's
    prefix cache does not flatter the first measured requests."""
    n = o.requests or DURATION_POOL
    if o.prompts_file:
        ps = pick(jsonl_prompts(o.prompts_file, o.output_len), n + o.warmup, o.seed)
        return ps[:n], ps[n:]
    tok = o.tokenizers.get(model) or _local_dir(listed.get(model, {}).get("root")) or _local_dir(model)
    if tok is None:
        raise InputError(f"model {model!r}: no local tokenizer to count synthetic prompt tokens with; pass --tokenizer "
                         "CHECKPOINT_DIR (the served model's directory) or use --prompts FILE.jsonl")
    key = str(Path(tok).resolve())
    if key not in cache:
        ps = synthetic_prompts(load_tokenizer(tok), n + o.warmup, o.input_len, o.output_len, o.seed)
        cache[key] = ps[:n], ps[n:]
    return cache[key]


def _local_dir(p) -> str | None:
    """``p`` if it is a local directory holding a tokenizer (e.g. vLLM's ``root`` of a served model)."""
    d = Path(str(p)) if p else None
    return str(d) if d is not None and d.is_dir() and any(d.glob("tokenizer*")) else None


class _Progress:
    def __init__(self, enabled: bool, desc: str, o: Options):
        from tqdm import tqdm

        self.by_time = o.requests is None
        total = o.duration if self.by_time else o.requests
        unit = "s" if self.by_time else "req"
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
        self.done = self.errors = 0

    def finished(self, rec: RequestRecord, t0: float) -> None:
        self.done += 1
        self.errors += not rec.ok
        if self.by_time:
            self.bar.n = min(time.perf_counter() - t0, self.bar.total)
        else:
            self.bar.n = self.done
        self.bar.set_postfix_str(f"{self.done} done, {self.errors} errors", refresh=True)

    def close(self):
        self.bar.close()


async def _measure(client, o: Options, model: str, point: LoadPoint, prompts: list[Prompt], seed: int,
                   stop: asyncio.Event, progress: _Progress | None) -> tuple[list[RequestRecord], float]:
    """One run at one load point. Returns every record (cancelled ones included) and its wall time."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = None if o.duration is None else t0 + o.duration
    limit = o.requests if o.requests is not None else math.inf

    async def one(i: int) -> None:
        rec = await http.send(client, o.url, model, prompts[i % len(prompts)], i, api_key=o.api_key, api=o.api,
                              ignore_eos=o.ignore_eos, timeout=o.timeout, on_sent=records.append)
        if progress:
            progress.finished(rec, t0)

    def more(i: int) -> bool:
        return i < limit and not stop.is_set() and (deadline is None or time.perf_counter() < deadline)

    async def drive() -> None:
        if point.mode == "concurrency":
            counter = iter(range(10**12))

            async def worker():
                while more(i := next(counter)):
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(int(point.value))))
            return
        n = o.requests if o.requests is not None else int(point.value * o.duration * 2 + 16) if not math.isinf(point.value) else 10**6
        sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None

        async def capped(i):
            if sem is None:
                return await one(i)
            async with sem:
                return await one(i)

        for i, offset in enumerate(arrival_offsets(n, point.value, o.poisson, o.burstiness, seed)):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if not more(i):
                break
            inflight.append(asyncio.ensure_future(capped(i)))
        await asyncio.gather(*inflight)

    inflight: list[asyncio.Future] = []  # rate mode's request tasks (concurrency mode's live under drive())
    main = asyncio.ensure_future(drive())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([main, stopper], return_when=asyncio.FIRST_COMPLETED)
    if not main.done():  # interrupted: cancel what is in flight; those records say "cancelled"
        for t in [main, *inflight]:
            t.cancel()
        await asyncio.gather(main, *inflight, return_exceptions=True)
    stopper.cancel()
    finished = [r.done for r in records if r.done is not None]
    return records, (max(finished) if finished else time.perf_counter()) - t0


async def _warmup(client, o: Options, model: str, point: LoadPoint, prompts: list[Prompt], stop: asyncio.Event) -> list[str]:
    if o.warmup == 0 or stop.is_set():
        return []
    width = max(1, min(o.warmup, int(point.value) if point.mode == "concurrency" else (point.max_concurrency or o.warmup)))
    sem = asyncio.Semaphore(width)

    async def one(i):
        async with sem:
            return await http.send(client, o.url, model, prompts[i % len(prompts)], i, api_key=o.api_key, api=o.api,
                                   ignore_eos=o.ignore_eos, timeout=o.timeout)

    recs = await _until_stopped(asyncio.gather(*(one(i) for i in range(o.warmup))), stop)
    return [] if recs is None else [r.error for r in recs if not r.ok]


async def _until_stopped(aw, stop: asyncio.Event):
    """Await ``aw``; if ``stop`` is set first, cancel it and return None."""
    task, stopper = asyncio.ensure_future(aw), asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def run_async(o: Options, *, progress: bool = True, stop: asyncio.Event | None = None) -> LoadTestReport:
    """The load test in the running event loop (for callers that are async themselves)."""
    stop = stop or asyncio.Event()
    listed = await http.preflight(o.url, o.models, o.api_key, timeout=min(o.timeout, 10.0))
    cache: dict = {}
    workloads = {m: _workload(o, m, listed, cache) for m in o.models}  # every prompt built before any load
    report = LoadTestReport(config=o.describe())
    width = max((p.max_concurrency or 0) if p.mode == "rate" else int(p.value) for p in o.points)
    uncapped = any(p.mode == "rate" and not p.max_concurrency for p in o.points)
    async with http.make_client(1024 if uncapped else width, o.timeout) as client:
        for k, point in enumerate(o.points):
            for model in o.models:
                if stop.is_set():
                    break
                measured_prompts, warm_prompts = workloads[model]
                failed = await _warmup(client, o, model, point, warm_prompts or measured_prompts, stop)
                if failed and progress:
                    print(f"warm-up of {model}: {len(failed)}/{o.warmup} failed ({', '.join(sorted(set(failed)))})", file=sys.stderr)
                bar = _Progress(progress, f"{model} @ {point.label}", o)
                try:
                    records, dur = await _measure(client, o, model, point, measured_prompts, o.seed + k, stop, bar)
                finally:
                    bar.close()
                measured = [r for r in records if r.error != "cancelled"]
                report.runs.append(RunResult(model, point, summarize(measured, dur, o.slo), records,
                                             cancelled=len(records) - len(measured)))
    report.interrupted = stop.is_set()
    return report


def run(o: Options, *, progress: bool = True) -> LoadTestReport:
    """Run in a fresh event loop; in the main thread, the first Ctrl-C stops with partial results."""

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = threading.current_thread() is threading.main_thread()
        if handled:
            def on_sigint():
                print("\ninterrupted: stopping, keeping partial results (Ctrl-C again to abort)", file=sys.stderr)
                stop.set()
                loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt

            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await run_async(o, progress=progress, stop=stop)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())
