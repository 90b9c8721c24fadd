"""Metric definitions over recorded request timestamps: pure functions, no I/O.

The definitions are the ones vLLM's benchmark client (``vllm bench serve``) and GuideLLM report,
so figures can be read side by side with theirs:

- **TTFT** (time to first token): from sending the request to the arrival of the first chunk that
  carries content (text, or a chat delta's ``content``/``reasoning_content``). A chat stream's
  opening role-only chunk does not count.
- **ITL** (inter-token latency): the gaps between consecutive content chunks, pooled over all
  requests (a chunk carrying several tokens is one gap, as in vLLM's client).
- **TPOT** (time per output token, excluding the first): per request
  ``(e2e - ttft) / (output_tokens - 1)``, for requests with more than one output token.
- **E2E** (end-to-end latency): from sending the request to the end of its response stream.
- Each is reported as mean, p50, p90 and p99 in milliseconds; percentiles interpolate linearly
  between order statistics (``numpy.percentile``'s default, as vLLM's client does).
- **Request throughput**: successful requests / duration. **Output tokens/s**: the successful
  requests' output tokens (as the server's usage report counts them) / duration. Duration is the
  wall time of the measured run, from the first request sent to the last one finished.
- **Goodput** (DistServe, https://arxiv.org/abs/2401.09670): successful requests meeting every
  given SLO (``ttft``, ``tpot``, ``e2e``, in ms) / duration. A request with a single output token
  has TPOT 0 for this purpose, as in vLLM's client.
- **Errors**: failed requests counted by kind (``http_500``, ``timeout``, ``stream_dropped``, ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from mergeserve.errors import ConfigError

LATENCIES = ("ttft", "itl", "tpot", "e2e")
STATS = ("mean", "p50", "p90", "p99")
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """What happened to one request. Times are ``time.perf_counter()`` seconds."""

    index: int
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    done: float | None = None  # end of the response stream (or of the failure)
    prompt_tokens: int | None = None  # from the server's usage report
    output_tokens: int | None = None  # from the server's usage report
    error: str | None = None  # kind, e.g. "http_500"; None = success
    detail: str = ""  # the error's message, for the report

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); None with fewer than 2 output tokens."""
        if not self.ok or not self.output_tokens or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Service level objectives for goodput, in milliseconds; None = not constrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft, r.ttft), (self.tpot, r.tpot or 0.0), (self.e2e, r.e2e))
        return all(limit is None or value * 1000 <= limit for limit, value in checks)

    def describe(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in SLO_KEYS if getattr(self, k) is not None)


def parse_slo(text: str | dict | SLO | None) -> SLO | None:
    """``"ttft=200,tpot=50"`` (milliseconds) -> SLO. Every bad item is named at once."""
    if text is None or isinstance(text, SLO):
        return text
    items = text.items() if isinstance(text, dict) else [p.partition("=")[::2] for p in str(text).split(",") if p.strip()]
    values, problems = {}, []
    for key, raw in items:
        key = {"e2el": "e2e"}.get(str(key).strip(), str(key).strip())  # vLLM's name for it
        if key not in SLO_KEYS:
            problems.append(f"--slo: unknown objective {key!r} (expected {', '.join(SLO_KEYS)})")
            continue
        try:
            v = float(raw)
        except (TypeError, ValueError):
            problems.append(f"--slo {key}: expected milliseconds, got {raw!r}")
            continue
        if not v > 0 or v == float("inf"):
            problems.append(f"--slo {key}: expected a positive number of milliseconds, got {raw!r}")
            continue
        values[key] = v
    if not values and not problems:
        problems.append(f"--slo: no objectives in {text!r} (expected e.g. ttft=200,tpot=50)")
    if problems:
        raise ConfigError.from_problems(problems, "--slo")
    return SLO(**values)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)."""
    return float(np.percentile(np.asarray(values, dtype=float), p))


def describe(values_s: list[float]) -> dict[str, float | None]:
    """Seconds -> {mean, p50, p90, p99} in milliseconds (None when there are no values)."""
    if not values_s:
        return {k: None for k in STATS}
    ms = [v * 1000 for v in values_s]
    return {"mean": float(np.mean(ms)), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


@dataclass
class Metrics:
    """The summary of one measured run (one model at one load point)."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (prompt + output) tokens/s
    input_tokens: int
    output_tokens: int
    ttft_ms: dict
    itl_ms: dict
    tpot_ms: dict
    e2e_ms: dict
    errors: dict[str, int]
    goodput: float | None = None  # requests/s meeting the SLO
    slo_attainment: float | None = None  # fraction of all requests meeting the SLO
    slo: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> Metrics:
    """Metrics of one run from its request records and measured wall duration."""
    ok = [r for r in records if r.ok]
    dur = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    m = Metrics(
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) / dur,
        output_throughput=out_tokens / dur,
        total_token_throughput=(in_tokens + out_tokens) / dur,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        ttft_ms=describe([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=describe([g for r in ok for g in r.itls]),
        tpot_ms=describe([r.tpot for r in ok if r.tpot is not None]),
        e2e_ms=describe([r.e2e for r in ok if r.e2e is not None]),
        errors=dict(sorted(Counter(r.error for r in records if not r.ok).items())),
    )
    if slo is not None:
        good = sum(slo.met_by(r) for r in records)
        m.goodput, m.slo, m.slo_attainment = good / dur, slo.describe(), good / len(records) if records else None
    return m


def run_duration(records: list[RequestRecord]) -> float:
    """Wall time from the first request sent to the last one finished (0 without records)."""
    if not records:
        return 0.0
    end = max((r.done if r.done is not None else r.sent) for r in records)
    return end - min(r.sent for r in records)
