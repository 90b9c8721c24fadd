"""Adaptive search (Optuna TPE and CMA-ES) through the ask/tell wrapper, on a known objective."""

from __future__ import annotations

import pytest

from mergeserve.sweep.search import AdaptiveSearch, objective_value
from mergeserve.sweep.spec import parse_spec

RECIPE = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.5}}


@pytest.mark.parametrize("kind", ["tpe", "cmaes"])
def test_adaptive_search_finds_the_minimum_of_a_known_bowl(kind):
    spec = parse_spec({
        "recipe": RECIPE, "batch_size": 4, "search": {"kind": kind, "budget": 40, "seed": 0},
        "axes": [{"path": "parameters.t", "low": 0.0, "high": 1.0}, {"path": "parameters.x", "low": -1.0, "high": 1.0},
                 {"path": "merge_method", "values": ["slerp", "linear"]}],
    })
    search = AdaptiveSearch(spec)
    seen = []
    while not search.done:
        asked = search.ask(spec.batch_size)
        assert 1 <= len(asked) <= 4
        for trial, (t, x, method) in asked:
            assert 0.0 <= t <= 1.0 and -1.0 <= x <= 1.0 and method in ("slerp", "linear")
            value = (t - 0.3) ** 2 + (x + 0.5) ** 2 + (0.0 if method == "linear" else 0.5)
            search.tell(trial, value)
            seen.append(value)
    assert len(seen) == 40  # exactly the budget
    assert min(seen) < 0.05  # a random guess lands there with probability ~1%
    assert min(seen[20:]) < min(seen[:4])  # it learned from the first batch


def test_objective_is_mean_log_perplexity_or_one_text():
    import math

    scores = {"code": {"ppl_token": math.e ** 2}, "prose": {"ppl_token": math.e ** 4}}
    spec = parse_spec({"recipe": RECIPE, "axes": [{"path": "parameters.t", "values": [0.5]}]})
    assert objective_value(spec, scores) == pytest.approx(3.0)
    spec = parse_spec({"recipe": RECIPE, "axes": [{"path": "parameters.t", "values": [0.5]}], "search": {"objective": "prose"}})
    assert objective_value(spec, scores) == pytest.approx(4.0)
