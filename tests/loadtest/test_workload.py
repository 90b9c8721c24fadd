"""Prompts and arrival schedules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mergeserve.errors import ConfigError, InputError
from mergeserve.loadtest.runner import make_options
from mergeserve.loadtest.workload import arrival_offsets, jsonl_prompts, load_tokenizer, pick, synthetic_prompts


def test_constant_rate_schedule():
    assert arrival_offsets(4, 2.0) == pytest.approx([0, 0.5, 1.0, 1.5])
    assert arrival_offsets(3, float("inf")) == [0, 0, 0]


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_poisson_schedule_statistics(burstiness):
    """Gamma gaps: mean 1/rate, coefficient of variation 1/sqrt(burstiness) (1 for Poisson)."""
    t = np.asarray(arrival_offsets(20001, 5.0, poisson=True, burstiness=burstiness, seed=3))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert arrival_offsets(50, 5.0, True, burstiness, seed=3) == arrival_offsets(50, 5.0, True, burstiness, seed=3)
    assert arrival_offsets(50, 5.0, True, burstiness, seed=3) != arrival_offsets(50, 5.0, True, burstiness, seed=4)


def test_synthetic_prompts_have_the_exact_token_count(tiny_family):
    tok_dir = tiny_family["mistral"]["code"]
    tok = load_tokenizer(tok_dir)
    prompts = synthetic_prompts(tok, 40, input_len=32, output_len=7, seed=0)  # seed 0: some draws need redrawing
    for p in prompts:
        assert len(tok.encode(p.text)) == 32 == p.input_tokens  # BOS included, as the server counts
        assert p.output_len == 7
    assert len({p.text for p in prompts}) == 40
    assert [p.text for p in synthetic_prompts(tok, 40, 32, 7, seed=0)] == [p.text for p in prompts]
    assert synthetic_prompts(tok, 1, 32, 7, seed=2)[0].text != prompts[0].text


def test_tokenizer_is_local_only(tmp_path):
    with pytest.raises(InputError, match="tokenizer"):
        load_tokenizer("some-org/not-a-local-model")


def test_jsonl_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "output_len": 3}\n\n{"prompt": "b"}\n')
    ps = jsonl_prompts(f, output_len=9)
    assert [(p.text, p.output_len) for p in ps] == [("a", 3), ("b", 9)]
    assert [p.text for p in pick(ps, 5, seed=0)] == ["a", "b", "a", "b", "a"]  # cycled
    assert len(pick(ps * 10, 5, seed=0)) == 5


def test_jsonl_problems_are_all_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(['{"prompt": "ok"}', "not json", json.dumps({"text": "x"}), json.dumps({"prompt": "x", "output_len": 0})]))
    with pytest.raises(ConfigError) as e:
        jsonl_prompts(f, 4)
    msg = str(e.value)
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg and "line 1" not in msg


def test_options_report_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_options("localhost:8000", ["a", "a"], concurrency=0, rate=-1.0, burstiness=0.5, requests=0,
                     input_len=0, timeout=0, api="grpc", tokenizer=str(tmp_path / "nope"), slo="ttft=soon")
    msg = str(e.value)
    for needle in ("--url", "--model", "--concurrency", "--rate", "--burstiness", "--requests", "--input-len",
                   "--timeout", "--api", "--tokenizer", "--slo"):
        assert needle in msg, needle


def test_option_defaults_and_sweeps():
    o = make_options("http://127.0.0.1:8000/v1/", ["a"])
    assert o.url == "http://127.0.0.1:8000" and o.requests == 100 and [p.label for p in o.points] == ["concurrency=8"]
    o = make_options("http://h:1", ["a"], rate=[1.0, 2.0], concurrency=4, poisson=True, duration=5)
    assert [p.label for p in o.points] == ["rate=1/s,max-concurrency=4", "rate=2/s,max-concurrency=4"]
    assert o.requests is None and o.duration == 5
    with pytest.raises(ConfigError, match="not both"):
        make_options("http://h:1", ["a"], rate=[1.0, 2.0], concurrency=[1, 2])
