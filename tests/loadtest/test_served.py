"""`mergeserve loadtest` against the real served tiny models (Ray Serve + vLLM CPU; the session's
one app from tests/serving_fixtures.py), two variants side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mergeserve.errors import EndpointError
from mergeserve.loadtest import run_loadtest

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


def _tokenizers(served):
    return {"marcoro14-tiny": str(served.checkpoints["bf16"]), "mistral-code": str(served.checkpoints["code"])}


def test_two_variants_side_by_side(served, tmp_path):
    report = run_loadtest(served.url, served.models, api_key=served.api_key, concurrency=4, requests=16, input_len=32,
                          output_len=16, tokenizer=_tokenizers(served), warmup=2, slo="ttft=600000", out_dir=tmp_path,
                          progress=False)
    assert report.models == served.models and not report.interrupted
    for run in report.runs:
        m = run.metrics
        assert (m.requests, m.completed, m.errors) == (16, 16, {}), m.errors
        for r in run.records:
            # ignore_eos: exactly max_tokens generated, as the server's usage report says; the prompt's tokens as
            # the server counted them equal our count with the model's own tokenizer
            assert r.output_tokens == 16 and r.prompt_tokens == 32
            assert 1 <= len(r.chunk_times) <= 16 and r.ttft > 0 and r.e2e >= r.ttft and r.tpot > 0
        assert m.output_tokens == 16 * 16 and m.input_tokens == 16 * 32
        assert m.output_throughput == pytest.approx(m.output_tokens / m.duration_s)
        assert m.goodput == pytest.approx(m.request_throughput)  # a 10-minute TTFT objective: all requests good
        assert m.ttft_ms["p50"] <= m.ttft_ms["p99"] and m.e2e_ms["mean"] >= m.ttft_ms["mean"]
    files = report.files
    assert json.loads(files["json"].read_text())["config"]["models"] == served.models
    assert len(files["csv"].read_text().splitlines()) == 3 and len(files["requests"].read_text().splitlines()) == 33
    assert files["latency_cdf"].read_bytes()[:8] == PNG


def test_cli_poisson_rate_and_chat(served, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "mergeserve.cli", "loadtest", "--url", served.url + "/v1", "--model", "mistral-code",
         "--tokenizer", str(served.checkpoints["code"]), "--rate", "8", "--poisson", "--concurrency", "4",
         "--requests", "8", "--input-len", "24", "--output-len", "8", "--api", "chat", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, MERGESERVE_API_KEY=served.api_key),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rate=8/s,max-concurrency=4" in p.stdout and "TTFT p99 ms" in p.stdout
    run = json.loads((out / "loadtest.json").read_text())["runs"][0]
    assert run["completed"] == 8 and run["errors"] == {} and run["output_tokens"] == 64


def test_bad_key_and_unknown_model_are_refused_before_any_load(served):
    with pytest.raises(EndpointError, match="401"):
        run_loadtest(served.url, served.models, api_key="wrong", requests=2, tokenizer=_tokenizers(served), progress=False)
    with pytest.raises(EndpointError, match="does not serve 'nope'"):
        run_loadtest(served.url, ["nope"], api_key=served.api_key, requests=2, progress=False)
