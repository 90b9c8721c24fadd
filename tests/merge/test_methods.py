"""Merge methods against independent formulas (no mergekit here; see test_oracle.py for that)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeserve.merge.methods import get_method, method_names
from mergeserve.merge.methods.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers

REQUIRED_METHODS = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
    "nearswap", "passthrough",
}


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_every_required_method_is_registered_once():
    assert REQUIRED_METHODS <= set(method_names())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_slerp_returns_each_input_exactly_at_the_ends(dtype):
    a, b = _rand(64, 32, seed=1, dtype=dtype), _rand(64, 32, seed=2, dtype=dtype)
    slerp = get_method("slerp")
    assert torch.equal(slerp([a, b], 0, t=0.0), a)
    assert torch.equal(slerp([a, b], 0, t=1.0), b)
    # the base is the t = 0 end wherever it sits in the recipe
    assert torch.equal(slerp([a, b], 1, t=0.0), b)


def test_slerp_matches_the_spherical_formula():
    a, b = _rand(4096, seed=3, dtype=torch.float64), _rand(4096, seed=4, dtype=torch.float64)
    t = 0.3
    theta = math.acos(float(torch.dot(a / a.norm(), b / b.norm())))
    expect = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    got = get_method("slerp")([a, b], 0, t=t)
    # t is a float32 coefficient in mergekit, hence the tolerance
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6)
    # the interpolated vector's norm stays between the endpoints' (a geodesic, not a chord)
    assert not torch.allclose(got, (1 - t) * a + t * b, atol=1e-3)


def test_slerp_near_colinear_inputs_fall_back_to_lerp():
    a = _rand(1000, seed=5)
    b = 2.0 * a + 1e-4 * _rand(1000, seed=6)  # cos > 0.9995
    t = 0.25
    got = get_method("slerp")([a, b], 0, t=t)
    assert torch.equal(got, (1 - torch.tensor(t)) * a + torch.tensor(t) * b)


def test_slerp_handles_zero_tensors():
    z = torch.zeros(10)
    b = torch.ones(10)
    got = get_method("slerp")([z, b], 0, t=0.5)
    assert torch.isfinite(got).all()


def test_linear_is_the_weighted_mean():
    xs = [_rand(8, 8, seed=i) for i in range(3)]
    w = [0.5, 0.3, 0.4]
    got = get_method("linear")(xs, None, weight=w, normalize=True)
    expect = sum(wi * x.double() for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(got.double(), expect, atol=1e-6)
    raw = get_method("linear")(xs, None, weight=w, normalize=False)
    assert torch.allclose(raw.double(), expect * sum(w), atol=1e-6)


def test_task_arithmetic_adds_weighted_deltas():
    base, a, b = (_rand(16, 16, seed=i, dtype=torch.float64) for i in range(3))
    got = get_method("task_arithmetic")(
        [base, a, b], 0, weight=[None, 0.5, 0.25], density=[None, 1.0, 1.0], normalize=False, rescale=False, **{"lambda": 0.8}
    )
    expect = base + 0.8 * (0.5 * (a - base) + 0.25 * (b - base))
    assert torch.allclose(got, expect, atol=1e-12)


def test_ties_keeps_only_entries_that_agree_with_the_elected_sign():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.tensor([3.0, 2.0, -1.0, -0.1], dtype=torch.float64)
    got = get_method("ties")([base, a, b], 0, weight=[None, 1.0, 1.0], density=[None, 1.0, 1.0])
    # column sums 4, 1, 1, 0.4 -> all positive; negative entries drop out; normalized by the kept weight count
    assert got.tolist() == [2.0, 2.0, 2.0, 0.5]


def test_magnitude_keeps_the_largest_fraction():
    d = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    kept = magnitude(d, 0.2)
    assert int((kept != 0).sum()) == 20 and kept[kept != 0].min() == 81
    outl = magnitude_outliers(d, 0.2, gamma=0.05)  # drop the top 5 as outliers, keep the next 20
    assert sorted(outl[outl != 0].tolist()) == list(range(76, 96))


@pytest.mark.parametrize("fn", ["bernoulli", "della"])
def test_random_sparsifiers_keep_density_and_are_reproducible(fn):
    d = _rand(256, 256, seed=7)

    def run(seed, rescale):
        g = torch.Generator().manual_seed(seed)
        if fn == "bernoulli":
            return bernoulli(d, 0.3, rescale, generator=g)
        return della_magprune(d, 0.3, 0.1, rescale, generator=g)

    x, y, z = run(1, False), run(1, False), run(2, False)
    assert torch.equal(x, y) and not torch.equal(x, z)
    frac = float((x != 0).float().mean())
    assert abs(frac - 0.3) < 0.01, frac
    # rescaling keeps the L1 norm, so the expectation of each entry is kept: average many draws
    mean = torch.stack([run(s, True) for s in range(200)]).mean(0)
    assert abs(float(mean.abs().sum() / d.abs().sum()) - 1) < 0.02
    assert float(torch.corrcoef(torch.stack([mean.flatten(), d.flatten()]))[0, 1]) > 0.95


def test_della_keeps_large_magnitudes_more_often():
    d = torch.linspace(0.01, 1, 1000).repeat(200, 1)
    kept = della_magprune(d, 0.5, 0.2, generator=torch.Generator().manual_seed(0)) != 0
    low, high = kept[:, :100].float().mean(), kept[:, -100:].float().mean()
    assert abs(float(low) - 0.32) < 0.03 and abs(float(high) - 0.68) < 0.03


def test_random_methods_are_reproducible_with_a_seeded_generator():
    base, a, b = (_rand(64, 64, seed=i) for i in range(3))
    m = get_method("dare_ties")
    kw = dict(weight=[None, 0.5, 0.5], density=[None, 0.4, 0.4])
    r1 = m([base, a, b], 0, generator=torch.Generator().manual_seed(5), **kw)
    r2 = m([base, a, b], 0, generator=torch.Generator().manual_seed(5), **kw)
    r3 = m([base, a, b], 0, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_model_stock_interpolation_ratio():
    # two orthogonal offsets: cos = 0 -> t = 0 -> the base
    base = torch.zeros(2)
    got = get_method("model_stock")([base, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], 0)
    assert torch.equal(got, base)
    # identical offsets: cos = 1 -> t = 1 -> their average
    got = get_method("model_stock")([base, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])], 0)
    assert torch.allclose(got, torch.tensor([1.0, 2.0]))


def test_nearswap_takes_close_values_only():
    a = torch.tensor([0.0, 0.0, 0.0])
    b = torch.tensor([0.0005, 0.01, 1.0])
    got = get_method("nearswap")([a, b], 0, t=0.001)
    assert torch.allclose(got, torch.tensor([0.0005, 0.001, 0.001]))


def test_karcher_of_equal_norm_vectors_is_the_normalised_mean_direction():
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = get_method("karcher")([a, b], None)
    assert torch.allclose(got, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))


def test_multislerp_of_two_matches_slerp_midpoint_direction():
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = get_method("multislerp")([a, b], None, weight=[0.5, 0.5])
    assert torch.allclose(got, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2), atol=1e-7)


def test_sce_with_one_model_and_full_selection_is_that_model():
    base, a = _rand(8, 8, seed=1, dtype=torch.float64), _rand(8, 8, seed=2, dtype=torch.float64)
    assert torch.allclose(get_method("sce")([base, a], 0), a)


def test_passthrough_scales():
    x = _rand(4, 4)
    assert torch.equal(get_method("passthrough")([x], None), x)
    assert torch.equal(get_method("passthrough")([x], None, scale=[2.0]), x * 2.0)
