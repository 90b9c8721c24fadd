"""Gradients, filters and precedence, checked against the formulas in the mergekit notes."""

import math

import pytest

from mergeserve.merge.config import parse_config
from mergeserve.merge.params import MISSING, interpolate_gradient, resolve


def _f(v):
    return float(v)


def test_gradient_over_eight_layers_matches_the_notes():
    # shared/notes/mergekit-semantics.md: [0, 0.5, 0.3, 0.7, 1] over 8 layers
    expected = [0, 0.2857, 0.4714, 0.3571, 0.4143, 0.6429, 0.8286, 1]
    got = [interpolate_gradient([0, 0.5, 0.3, 0.7, 1], i / 7) for i in range(8)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_gradient_independent_formula():
    vals = [2.0, -1.0, 4.0]
    for t in [0, 0.1, 0.25, 0.5, 0.77, 1]:
        # piecewise-linear interpolation through evenly spaced knots, written another way
        x = t * (len(vals) - 1)
        k = min(int(math.floor(x)), len(vals) - 2)
        expect = vals[k] + (x - k) * (vals[k + 1] - vals[k])
        assert interpolate_gradient(vals, t) == pytest.approx(expect)


def test_non_numeric_gradients_pick_instead_of_interpolating():
    assert interpolate_gradient([True, False], 0.4) is True
    assert interpolate_gradient([True, False], 1.0) is False
    assert interpolate_gradient(["a", "b", "c"], 0.6) == "b"


def _cfg(params):
    return parse_config(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}],
            "parameters": params,
        }
    )


def test_filters_first_match_wins_and_catch_all():
    c = _cfg({"t": [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.9}, {"value": 0.5}]})
    scopes = [c.parameters]
    assert resolve("t", scopes, "model.layers.0.self_attn.q_proj.weight", 0, _f) == 0.1
    assert resolve("t", scopes, "model.layers.0.mlp.up_proj.weight", 0, _f) == 0.5
    assert resolve("t", scopes, "model.embed_tokens.weight", 0, _f) == 0.5


def test_unmatched_filter_list_falls_through_to_next_scope():
    c = _cfg({"t": [{"filter": "mlp", "value": 0.9}]})
    slice_scope = {"t": c.parameters["t"]}
    top = {"t": 0.25}
    assert resolve("t", [slice_scope, top], "model.norm.weight", 0, _f) == 0.25
    assert resolve("t", [slice_scope, top], "model.layers.1.mlp.down_proj.weight", 0, _f) == 0.9


def test_precedence_source_over_slice_over_top_over_default():
    src, sl, top = {"weight": 3}, {"weight": 2}, {"weight": 1}
    name = "model.layers.0.mlp.up_proj.weight"
    assert resolve("weight", [src, sl, top], name, 0, _f) == 3
    assert resolve("weight", [None, sl, top], name, 0, _f) == 2
    assert resolve("weight", [None, None, top], name, 0, _f) == 1
    assert resolve("weight", [None, None, None], name, 0, _f, default=7) == 7
    assert resolve("weight", [None, None, None], name, 0, _f) is MISSING


def test_gradient_inside_filter_is_interpolated_at_layer_position():
    c = _cfg({"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]})
    assert resolve("t", [c.parameters], "model.layers.2.self_attn.o_proj.weight", 0.25, _f) == 0.25
