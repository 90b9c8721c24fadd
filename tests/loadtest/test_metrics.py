"""Metric definitions against values computed by hand from recorded timestamps."""

from __future__ import annotations

import pytest

from mergeserve.errors import ConfigError
from mergeserve.loadtest.metrics import SLO, RequestRecord, parse_slo, percentile, run_duration, summarize


def _records():
    # sent, content chunk arrivals, end of stream, usage; then two failures
    return [
        RequestRecord(0, sent=0.0, chunk_times=[0.1, 0.3, 0.4], done=0.5, prompt_tokens=10, output_tokens=4),
        RequestRecord(1, sent=1.0, chunk_times=[1.3, 1.5], done=1.6, prompt_tokens=5, output_tokens=2),
        RequestRecord(2, sent=2.0, chunk_times=[2.2], done=2.25, prompt_tokens=3, output_tokens=1),
        RequestRecord(3, sent=2.5, done=2.6, error="http_500"),
        RequestRecord(4, sent=3.0, chunk_times=[3.1], done=4.0, error="timeout"),
    ]


def test_per_request_definitions():
    r0, r1, r2, r3, _ = _records()
    assert r0.ttft == pytest.approx(0.1) and r0.e2e == pytest.approx(0.5)
    assert r0.itls == pytest.approx([0.2, 0.1])
    assert r0.tpot == pytest.approx((0.5 - 0.1) / (4 - 1))  # (e2e - ttft) / (output_tokens - 1)
    assert r1.tpot == pytest.approx(0.3)
    assert r2.tpot is None and r2.itls == []  # one output token: no TPOT
    assert r3.ttft is None and r3.tpot is None


def test_percentiles_interpolate_linearly():
    assert percentile([100, 300, 200], 50) == pytest.approx(200)
    assert percentile([100, 300, 200], 90) == pytest.approx(280)  # rank 0.9*2 = 1.8: 200 + 0.8*100
    assert percentile([100, 300, 200], 99) == pytest.approx(298)
    assert percentile([5.0], 99) == 5.0


def test_summary_by_hand():
    m = summarize(_records(), duration_s=4.0)
    assert (m.requests, m.completed, m.failed) == (5, 3, 2)
    assert m.errors == {"http_500": 1, "timeout": 1}
    assert m.ttft_ms == pytest.approx({"mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0})
    assert m.itl_ms == pytest.approx({"mean": 500 / 3, "p50": 200.0, "p90": 200.0, "p99": 200.0})
    tpots = [400 / 3, 300.0]
    assert m.tpot_ms == pytest.approx({"mean": sum(tpots) / 2, "p50": sum(tpots) / 2,
                                       "p90": tpots[0] + 0.9 * (tpots[1] - tpots[0]), "p99": tpots[0] + 0.99 * (tpots[1] - tpots[0])})
    assert m.e2e_ms == pytest.approx({"mean": 450.0, "p50": 500.0, "p90": 580.0, "p99": 598.0})
    assert m.request_throughput == pytest.approx(3 / 4)
    assert (m.input_tokens, m.output_tokens) == (18, 7)  # successful requests only
    assert m.output_throughput == pytest.approx(7 / 4)
    assert m.total_token_throughput == pytest.approx(25 / 4)
    assert m.goodput is None


def test_goodput():
    # r0: ttft 100, tpot 133 -> good; r1: ttft 300 -> not; r2: ttft 200, one token (tpot 0) -> good
    m = summarize(_records(), 4.0, SLO(ttft=250, tpot=200))
    assert m.goodput == pytest.approx(2 / 4) and m.slo_attainment == pytest.approx(2 / 5)
    m = summarize(_records(), 4.0, SLO(e2e=400))  # only r2 (250 ms)
    assert m.goodput == pytest.approx(1 / 4)
    m = summarize(_records(), 4.0, SLO(tpot=100))  # r2 only: r0's 133 ms and r1's 300 ms exceed it
    assert m.goodput == pytest.approx(1 / 4)


def test_no_successes_gives_empty_latencies_not_errors():
    m = summarize([RequestRecord(0, 0.0, done=0.1, error="connect_error")], 0.1, SLO(ttft=1))
    assert m.completed == 0 and m.ttft_ms["mean"] is None and m.output_throughput == 0 and m.goodput == 0


def test_run_duration():
    assert run_duration(_records()) == pytest.approx(4.0)
    assert run_duration([]) == 0.0


def test_parse_slo():
    assert parse_slo("ttft=200,tpot=50") == SLO(ttft=200, tpot=50)
    assert parse_slo({"e2e": 1000}) == SLO(e2e=1000)
    assert parse_slo(None) is None
    with pytest.raises(ConfigError) as e:
        parse_slo("foo=1,ttft=fast,tpot=-3")
    assert len(e.value.problems) == 3 and "foo" in str(e.value) and "ttft" in str(e.value) and "tpot" in str(e.value)
