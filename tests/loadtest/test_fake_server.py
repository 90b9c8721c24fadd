"""The load tester against a local server that misbehaves in known ways (tests/loadtest/fake_server.py):
the figures it reports must match what that server did, and no failure may hang it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeserve.errors import EndpointError
from mergeserve.loadtest import run_loadtest
from tests.loadtest.fake_server import Behaviour, FakeOpenAIServer
from tests.serving_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prompts(tmp_path) -> Path:
    """20 unique prompts of 1..20 words (the fake server counts words as prompt tokens)."""
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": " ".join(["w"] * i) + f" req-{i}"}) for i in range(20)) + "\n")
    return f


def test_figures_match_what_the_server_did(prompts, tmp_path):
    b = Behaviour(ttft=0.2, itl=0.01, tokens_per_chunk=2, fail_every=5, drop_every=7)
    with FakeOpenAIServer(b) as server:
        report = run_loadtest(server.url, ["alpha"], api_key=b.api_key, concurrency=4, requests=20, output_len=8,
                              prompts_file=prompts, warmup=0, out_dir=tmp_path / "out", progress=False)
    m, did = report.metrics("alpha"), server.outcomes()
    # counts: every 5th request failed, every 7th (not failed) dropped: 4 and 2 of 20
    assert did == {"ok": 14, "http_500": 4, "stream_dropped": 2}
    assert m.errors == {"http_500": 4, "stream_dropped": 2} and m.completed == 14 and m.requests == 20
    # tokens come from the usage report (8 per request), not from counting chunks (2 tokens per chunk)
    ok = [r for r in report.runs[0].records if r.ok]
    assert all(r.output_tokens == 8 and len(r.chunk_times) == 4 for r in ok)
    assert m.output_tokens == sum(s.tokens for s in server.log if s.outcome == "ok") == 112
    by_prompt = {s.prompt: s for s in server.log}
    # timestamps: the server runs in this process, so both sides share one clock
    prompts_by_index = [json.loads(ln)["prompt"] for ln in prompts.read_text().splitlines()]
    for r in ok:
        s = by_prompt[prompts_by_index[r.index]]
        assert r.prompt_tokens == len(s.prompt.split())
        assert r.sent <= s.received and r.chunk_times[0] >= s.first_content  # TTFT brackets the server's
        assert r.ttft >= b.ttft  # the empty first chunk (no content) did not stop the clock
    assert 200 <= m.ttft_ms["mean"] < 200 + 300 and 200 <= m.ttft_ms["p50"]  # near the server's 200 ms, not 0
    assert m.itl_ms["p50"] >= 9  # 10 ms between content chunks (a gap may shrink by buffering, never the median)
    tpots = [(r.e2e - r.ttft) / 7 * 1000 for r in ok]
    assert m.tpot_ms["mean"] == pytest.approx(sum(tpots) / len(tpots))
    assert m.request_throughput == pytest.approx(14 / m.duration_s)
    # files
    files = report.files
    assert {"json", "csv", "requests", "latency_cdf"} <= set(files) and all(Path(p).stat().st_size > 0 for p in files.values())
    saved = json.loads(files["json"].read_text())
    assert saved["runs"][0]["errors"] == {"http_500": 4, "stream_dropped": 2}
    assert len(files["requests"].read_text().splitlines()) == 21


def test_chat_ttft_waits_for_content_not_the_role_chunk(prompts):
    with FakeOpenAIServer(Behaviour(ttft=0.3)) as server:
        report = run_loadtest(server.url, "alpha", api_key="fake-key", api="chat", concurrency=2, requests=4,
                              output_len=3, prompts_file=prompts, warmup=1, progress=False)
    m = report.metrics("alpha")
    assert m.completed == 4 and m.ttft_ms["p50"] >= 300 and m.output_tokens == 12
    assert len(server.log) == 5  # the warm-up request reached the server but is not in the figures
    assert server.log[0].prompt not in {s.prompt for s in server.log[1:]}  # and it warmed no measured prompt's cache


def test_side_by_side_sweep_with_a_model_that_vanished(prompts, tmp_path):
    """'ghost' passes the pre-flight listing but every request gets 404: counted, the run goes on."""
    with FakeOpenAIServer(Behaviour(ttft=0.05, itl=0.0)) as server:
        report = run_loadtest(server.url, ["alpha", "ghost"], api_key="fake-key", concurrency=[1, 3], requests=6,
                              output_len=4, prompts_file=prompts, warmup=0, slo="ttft=1000", out_dir=tmp_path,
                              progress=False)
    assert [(r.model, r.point.label) for r in report.runs] == [
        ("alpha", "concurrency=1"), ("ghost", "concurrency=1"), ("alpha", "concurrency=3"), ("ghost", "concurrency=3")]
    for r in report.runs:
        assert r.metrics.errors == ({} if r.model == "alpha" else {"http_404": 6})
    assert report.metrics("alpha", 1).goodput == pytest.approx(6 / report.metrics("alpha", 1).duration_s)
    assert server.outcomes() == {"ok": 12, "http_404": 12}
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert len((tmp_path / "loadtest.csv").read_text().splitlines()) == 5
    table = report.table()
    assert "alpha" in table and "ghost" in table and "http_404 6" in table


def test_connections_are_reused(prompts):
    """A finished stream's connection serves the next request: opening one per request would cost
    the server a connection set-up each time and bias throughput (found against vLLM's client)."""
    with FakeOpenAIServer(Behaviour(ttft=0.0, itl=0.0)) as server:
        report = run_loadtest(server.url, "alpha", api_key="fake-key", concurrency=2, requests=12, output_len=3,
                              prompts_file=prompts, warmup=2, progress=False)
    assert report.metrics("alpha").completed == 12 and len(server.log) == 14
    assert server.connections <= 2 + 1  # the pre-flight check has its own session


def test_rate_mode_paces_requests(prompts):
    with FakeOpenAIServer(Behaviour(ttft=0.01, itl=0.0)) as server:
        report = run_loadtest(server.url, "alpha", api_key="fake-key", rate=20.0, requests=10, output_len=2,
                              prompts_file=prompts, warmup=0, progress=False)
    sent = sorted(r.sent for r in report.runs[0].records)
    assert report.metrics("alpha").completed == 10
    assert sent[-1] - sent[0] >= 9 / 20 * 0.95  # one every 50 ms, not all at once
    received = sorted(s.received for s in server.log)
    gaps = sorted(b - a for a, b in zip(received, received[1:]))
    assert 0.03 < gaps[len(gaps) // 2] < 0.1  # the server saw them about 50 ms apart (median gap)


def test_preflight_errors_are_clear_and_quick(prompts):
    with FakeOpenAIServer() as server:
        t0 = time.perf_counter()
        with pytest.raises(EndpointError, match="401.*API key"):
            run_loadtest(server.url, "alpha", api_key="wrong", requests=2, prompts_file=prompts, progress=False)
        with pytest.raises(EndpointError, match=r"does not serve 'nope'.*alpha"):
            run_loadtest(server.url, ["alpha", "nope"], api_key="fake-key", requests=2, prompts_file=prompts, progress=False)
        assert not [s for s in server.log]  # nothing but the model listing was sent
    with pytest.raises(EndpointError, match="cannot connect"):
        run_loadtest(f"http://127.0.0.1:{free_port()}", "alpha", requests=2, prompts_file=prompts, progress=False)
    assert time.perf_counter() - t0 < 10


def test_a_hanging_server_times_out_every_request(prompts):
    with FakeOpenAIServer() as server:
        t0 = time.perf_counter()
        report = run_loadtest(server.url, "hang", api_key="fake-key", concurrency=3, requests=3, timeout=1.0,
                              prompts_file=prompts, warmup=0, progress=False)
        assert time.perf_counter() - t0 < 5
    assert report.metrics("hang").errors == {"timeout": 3}


def test_server_dying_mid_run_is_counted(prompts):
    with FakeOpenAIServer(Behaviour(ttft=0.05, itl=0.05)) as server:
        import threading

        def stop_after_four_answers():
            while sum(s.tokens == 10 for s in server.log) < 4:
                time.sleep(0.01)
            server.stop()

        threading.Thread(target=stop_after_four_answers, daemon=True).start()
        t0 = time.perf_counter()
        report = run_loadtest(server.url, "alpha", api_key="fake-key", concurrency=2, requests=40, output_len=10,
                              prompts_file=prompts, warmup=0, timeout=5, progress=False)
        assert time.perf_counter() - t0 < 15
    m = report.metrics("alpha")
    assert m.requests == 40 and 2 <= m.completed < 40
    assert set(m.errors) <= {"connect_error", "stream_dropped"} and sum(m.errors.values()) == 40 - m.completed
    served_whole = sum(s.outcome == "ok" and s.tokens == 10 for s in server.log)
    assert served_whole - 2 <= m.completed <= served_whole  # (a stream cut after its last token but before [DONE] fails)


def test_ctrl_c_keeps_partial_results(prompts, tmp_path):
    with FakeOpenAIServer(Behaviour(ttft=0.1, itl=0.01)) as server:
        cmd = [sys.executable, "-m", "mergeserve.cli", "loadtest", "--url", server.url, "--model", "alpha",
               "--requests", "100000", "--concurrency", "2", "--output-len", "4", "--prompts", str(prompts),
               "--out", str(tmp_path / "out"), "-q"]
        env = dict(os.environ, MERGESERVE_API_KEY="fake-key", PYTHONPATH=str(REPO))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and sum(s.tokens == 4 for s in server.log) < 8:  # 2 warm-up + 6
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "partial results" in err and "concurrency=2" in out
    saved = json.loads((tmp_path / "out" / "loadtest.json").read_text())
    run = saved["runs"][0]
    assert saved["interrupted"] is True and run["completed"] >= 4 and run["requests"] < 100000
    assert run["errors"] == {}  # requests cut off by Ctrl-C are not server errors
