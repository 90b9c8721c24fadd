"""lm-evaluation-harness tasks are optional: without the package the sweep says what to install."""

from __future__ import annotations

import importlib.util

import pytest

from mergeserve.errors import ConfigError
from mergeserve.eval.harness import run_lm_eval


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here")
def test_missing_lm_eval_is_a_clear_config_error(tiny_family):
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks: needs the 'lm-eval' package"):
        run_lm_eval(tiny_family["mistral"]["code"], ["hellaswag"])
