"""`mergeserve loadtest` argument handling: the models file, sweeps, and bad input (exit 2, one message)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeserve.cli import build_parser
from mergeserve.errors import ConfigError
from mergeserve.loadtest.cli import read_models_file

REPO = Path(__file__).resolve().parents[2]


def test_models_file_text_and_yaml(tmp_path):
    f = tmp_path / "models.txt"
    f.write_text("# variants\nmarcoro14-tiny\n\nmistral-code  # the parent\n")
    assert read_models_file(str(f)) == (["marcoro14-tiny", "mistral-code"], {})
    y = tmp_path / "models.yaml"
    y.write_text("- a\n- {model: b, tokenizer: /ckpt/b}\n")
    assert read_models_file(str(y)) == (["a", "b"], {"b": "/ckpt/b"})
    y.write_text("- a\n- {name: b}\n- 3\n")
    with pytest.raises(ConfigError) as e:
        read_models_file(str(y))
    assert "entry 2" in str(e.value) and "entry 3" in str(e.value)


def test_sweep_lists_parse():
    a = build_parser().parse_args(["loadtest", "--url", "http://h:1", "--model", "m", "--rate", "1,2.5,inf", "--concurrency", "4"])
    assert a.rate == [1.0, 2.5, float("inf")] and a.concurrency == 4
    a = build_parser().parse_args(["loadtest", "--url", "http://h:1", "--model", "m", "--concurrency", "1,8"])
    assert a.concurrency == [1, 8] and a.rate is None


def test_bad_options_exit_2_with_every_problem_before_any_request():
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "mergeserve.cli", "loadtest", "--url", "http://127.0.0.1:9/", "--model", "m",
         "--concurrency", "0", "--poisson", "--slo", "ttft=soon", "--requests", "0"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("mergeserve: error: loadtest: 4 problems")
    for needle in ("--concurrency", "--poisson", "--slo ttft", "--requests"):
        assert needle in err
    assert "cannot connect" not in err and time.time() - t0 < 60  # nothing was sent: 127.0.0.1:9 never tried
