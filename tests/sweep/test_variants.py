"""Sweep specs and variants without Ray: axis paths, grids, random draws, de-duplication, batching,
and every bad input the issue lists, each refused before any work with a message that names it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeserve.errors import ConfigError
from mergeserve.merge.options import MergeOptions
from mergeserve.sweep.spec import parse_spec
from mergeserve.sweep.variants import apply_axis, batches, check_axes, grid_variants, plan_variants, random_variants

REPO = Path(__file__).resolve().parents[2]
RECIPE = {
    "merge_method": "slerp", "base_model": "mistral-code", "dtype": "bfloat16",
    "slices": [{"sources": [{"model": "mistral-code", "layer_range": [0, 4]}, {"model": "mistral-prose", "layer_range": [0, 4]}]}],
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]},
}


def _spec(**over):
    data = {"recipe": RECIPE, "axes": [{"path": "parameters.t[mlp]", "values": [0.1, 0.9]}], **over}
    return parse_spec(data)


def test_apply_axis_paths():
    r = apply_axis(RECIPE, "parameters.t[self_attn]", [0.2, 0.4])
    assert r["parameters"]["t"][0] == {"filter": "self_attn", "value": [0.2, 0.4]}
    assert RECIPE["parameters"]["t"][0]["value"] == [0, 1]  # the base recipe is untouched
    assert apply_axis(RECIPE, "parameters.t[*]", 0.7)["parameters"]["t"][2]["value"] == 0.7
    assert apply_axis(RECIPE, "slices[0].sources[1].layer_range", [0, 4])["slices"][0]["sources"][1]["layer_range"] == [0, 4]
    assert apply_axis(RECIPE, "merge_method", "linear")["merge_method"] == "linear"
    assert apply_axis({"parameters": {}}, "parameters.t", 0.1)["parameters"]["t"] == 0.1  # new key
    with pytest.raises(ValueError, match=r"no filter entry 'attn' \(entries: self_attn, mlp, \*\)"):
        apply_axis(RECIPE, "parameters.t[attn]", 0.1)
    with pytest.raises(ValueError, match="index out of range"):
        apply_axis(RECIPE, "slices[3].sources", [])
    with pytest.raises(ValueError, match="not in the recipe"):
        apply_axis(RECIPE, "models[0].parameters.weight", 1.0)


def test_grid_random_and_labels():
    spec = _spec(axes=[{"path": "parameters.t[mlp]", "name": "t_mlp", "low": 0, "high": 1, "steps": 5},
                       {"path": "parameters.t[self_attn]", "values": [0.5, [0, 1]]}])
    grid = grid_variants(spec, RECIPE)
    assert len(grid) == 10 and grid[0].name == "v000" and grid[-1].name == "v009"
    assert [v.values[0][1] for v in grid[::2]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid[1].label == "t_mlp=0, parameters.t[self_attn]=[0,1]"
    assert grid[1].recipe["parameters"]["t"][1]["value"] == 0.0
    rspec = _spec(axes=[{"path": "parameters.t[mlp]", "low": 0.2, "high": 0.4}], search={"kind": "random", "samples": 6, "seed": 3})
    a, b = random_variants(rspec, RECIPE), random_variants(rspec, RECIPE)
    assert [v.values for v in a] == [v.values for v in b] and len(a) == 6  # seeded
    assert all(0.2 <= v.values[0][1] <= 0.4 for v in a) and len({v.values for v in a}) == 6


def test_identical_variants_are_planned_as_duplicates_and_batched_once(tiny_dir):
    spec = _spec(axes=[{"path": "parameters.t[mlp]", "values": [0.3, [0.3, 0.3], 0.8, 0.6, 0.4]}], batch_size=2)
    planned = plan_variants(grid_variants(spec, RECIPE), MergeOptions(models_dir=tiny_dir))
    assert [p.duplicate_of for p in planned] == [None, "v000", None, None, None]
    groups = batches(planned, 2)
    assert [[p.name for p in b] for b in groups] == [["v000", "v002"], ["v003", "v004"]]


def test_spec_schema_errors_all_at_once():
    with pytest.raises(ConfigError) as e:
        parse_spec({"recipe": RECIPE, "axes": [{"path": "parameters.t", "values": []}, {"path": "parameters.t", "low": 1, "high": 0}],
                    "search": {"kind": "tpe", "budget": 0}, "batch_size": 0, "bogus": 1})
    msg = str(e.value)
    for part in ("axes[0]: 'values' is empty", "axes[1]: 'low' (1.0) must be below", "search.budget: tpe search needs a budget >= 1, got 0",
                 "batch_size: Input should be greater than or equal to 1", "bogus: unknown field"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="search.samples: random search needs samples >= 1"):
        parse_spec({"recipe": RECIPE, "axes": [{"path": "parameters.t", "values": [1]}], "search": {"kind": "random", "samples": 0}})
    with pytest.raises(ConfigError, match=r"axes: List should have at least 1 item"):
        parse_spec({"recipe": RECIPE, "axes": []})


def test_unknown_parameters_and_methods_are_named():
    spec = _spec(axes=[{"path": "parameters.tt", "values": [0.1]}, {"path": "parameters.t[nope]", "values": [0.1]}])
    problems = check_axes(spec, RECIPE)
    assert any("'tt' is not a parameter of slerp (its parameters: t)" in p for p in problems)
    assert any("axes[1].path" in p and "no filter entry 'nope'" in p for p in problems)
    spec = _spec(axes=[{"path": "merge_method", "values": ["slerp", "slurp"]}])
    assert any("unknown merge method 'slurp'" in p for p in check_axes(spec, RECIPE))


def _write(tmp_path: Path, tiny_dir: Path, **over) -> Path:
    data = {
        "recipe": RECIPE, "models_dir": str(tiny_dir), "axes": [{"path": "parameters.t[mlp]", "values": [0.2, 0.8]}],
        "eval": {"texts": {"code": str(tiny_dir / "heldout" / "code.txt")}}, **over,
    }
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "mergeserve.cli", "sweep", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "over, expect",
    [
        ({"axes": [{"path": "parameters.density", "values": [0.5]}]}, "'density' is not a parameter of slerp"),
        ({"axes": [{"path": "parameters.t", "values": []}]}, "'values' is empty"),
        ({"search": {"kind": "cmaes", "budget": 0}}, "search.budget: cmaes search needs a budget >= 1, got 0"),
        ({"eval": {"texts": {"code": "/nonexistent/code.txt"}}}, "eval.texts.code: file not found: /nonexistent/code.txt"),
        ({"axes": [{"path": "parameters.t[mlp]", "values": [0.2, "high"]}]}, "variant v001 (parameters.t[mlp]=high): "),
        ({"search": {"kind": "grid"}, "axes": [{"path": "parameters.t[mlp]", "low": 0, "high": 1}]}, "a grid search needs 'values' or 'steps'"),
    ],
    ids=["unknown-param", "empty-grid", "budget", "missing-eval-file", "invalid-variant", "range-without-steps"],
)
def test_cli_refuses_bad_sweeps_before_any_work(tmp_path, tiny_dir, over, expect):
    spec = _write(tmp_path, tiny_dir, **over)
    out = tmp_path / "out"
    r = _cli(spec, out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeserve: error:") and expect in lines[0], r.stderr
    assert not out.exists()  # nothing was started, nothing written


def test_plan_only_lists_variants_and_shared_reads(tmp_path, tiny_dir):
    spec = _write(tmp_path, tiny_dir, axes=[{"path": "parameters.t[mlp]", "values": [0.2, 0.8, [0.2, 0.2]]}], batch_size=4)
    r = _cli(spec, tmp_path / "out", "--plan-only")
    assert r.returncode == 0, r.stderr
    assert "3 variants (2 unique) in 1 batch(es)" in r.stdout and "v002: parameters.t[mlp]=[0.2,0.2]  (= v000)" in r.stdout
    reads = [float(x) for x in r.stdout.split("reads ")[1].split(" GB one")[0].split(" GB vs ")]
    assert reads[1] == pytest.approx(3 * reads[0], rel=1e-3)
    assert not (tmp_path / "out").exists()


def test_every_sweep_in_configs_validates(tiny_dir, tmp_path):
    from mergeserve.sweep.runner import prepare

    specs = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert len(specs) >= 3
    for path in specs:
        data = yaml.safe_load(path.read_text())
        if isinstance(data["recipe"], str):
            data["recipe"] = str((path.parent / data["recipe"]).resolve())
        data["models_dir"] = str(tiny_dir)  # the tests' family may live outside the repo's .cache
        data["eval"]["texts"] = {k: str(tiny_dir / "heldout" / Path(v).name) for k, v in data["eval"]["texts"].items()}
        p = tmp_path / path.name
        p.write_text(json.dumps(data))
        assert prepare(p, tmp_path / "out" / path.stem).spec.axes


# A multi-stage recipe: pair and side read the tiny family's models; the unnamed final reads both.
STAGED = [
    {"name": "pair", "merge_method": "linear", "dtype": "bfloat16",
     "models": [{"model": "mistral-code", "parameters": {"weight": 0.6}}, {"model": "mistral-prose", "parameters": {"weight": 0.4}}]},
    {"name": "side", "merge_method": "slerp", "base_model": "mistral-code", "dtype": "bfloat16", "parameters": {"t": 0.3},
     "models": [{"model": "mistral-code"}, {"model": "mistral-base"}]},
    {"merge_method": "slerp", "base_model": "pair", "dtype": "bfloat16", "parameters": {"t": 0.5},
     "models": [{"model": "pair"}, {"model": "side"}]},
]
STAGED_AXES = [{"path": "stages[pair].models[0].parameters.weight", "name": "w", "values": [0.6, 0.8]},
               {"path": "stages[(final)].parameters.t", "name": "t", "values": [0.2, 0.7]}]


def test_axes_into_the_stages_of_a_multi_stage_recipe(tmp_path):
    from mergeserve.sweep.variants import load_recipe, stage_variants

    spec = parse_spec({"recipe": STAGED, "axes": STAGED_AXES})
    recipe = load_recipe(spec, tmp_path)
    assert check_axes(spec, recipe) == []
    r = apply_axis(recipe, "stages[side].parameters.t", 0.9)
    assert r["stages"][1]["parameters"]["t"] == 0.9 and recipe["stages"][1]["parameters"]["t"] == 0.3
    variants = grid_variants(spec, recipe)
    assert [v.label for v in variants] == ["w=0.6, t=0.2", "w=0.6, t=0.7", "w=0.8, t=0.2", "w=0.8, t=0.7"]
    staged, finals = stage_variants(variants, tmp_path / "stages")
    # two distinct pair stages (w), one side stage shared by every variant; four finals reading them
    assert sorted(s.name.rsplit("-", 1)[0] for s in staged) == ["pair", "pair", "side"]
    pair_w = {s.config.models[0].parameters["weight"]: s.dest for s in staged if s.name.startswith("pair")}
    assert sorted(pair_w) == [0.6, 0.8]
    side = next(s.dest for s in staged if s.name.startswith("side"))
    for v, final in zip(variants, finals):
        w, t = dict(v.values)["w"], dict(v.values)["t"]
        models = [m["model"] for m in final.recipe["models"]]
        assert final.recipe["parameters"]["t"] == t and models == [{"path": str(pair_w[w])}, {"path": str(side)}]


def test_stage_axes_are_checked_with_the_other_axes():
    spec = parse_spec({"recipe": STAGED, "axes": [
        {"path": "parameters.t", "values": [0.1]},  # no stage named
        {"path": "stages[nope].parameters.t", "values": [0.1]},
        {"path": "stages[pair].models[0].parameters.t", "values": [0.1]},  # pair is linear: no t
        {"path": "stages[side].parameters.weight", "values": [0.1]},  # side is slerp (or slurp): no weight
        {"path": "stages[side].merge_method", "values": ["slerp", "slurp"]},
    ]})
    from mergeserve.sweep.variants import load_recipe

    problems = check_axes(spec, load_recipe(spec, Path(".")))
    for part in ("axes[0].path: the recipe has several stages: start the path with stages[NAME] (stages: pair, side, (final))",
                 "axes[1].path: stages: no stage named 'nope' (stages: pair, side, (final))",
                 "axes[2].path: 't' is not a parameter of linear",
                 "axes[3].path: 'weight' is not a parameter of slerp",
                 "axes[4].values: unknown merge method 'slurp'"):
        assert any(part in p for p in problems), (part, problems)


def test_cli_refuses_a_bad_stage_axis_before_any_work(tmp_path, tiny_dir):
    data = {"recipe": STAGED, "models_dir": str(tiny_dir), "axes": [{"path": "stages[pair].models[1].parameters.t", "values": [0.2]}]}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(data))
    r = _cli(spec, tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "axes[0].path: 't' is not a parameter of linear" in r.stderr and not (tmp_path / "out").exists()


def test_a_multi_stage_sweep_plans_its_model_only_stages_up_front(tmp_path, tiny_dir):
    from mergeserve.sweep.runner import prepare

    bad = [dict(STAGED[0], models=[{"model": "mistral-code", "parameters": {"weight": 0.5}}, {"model": "mistral-nope"}]), *STAGED[1:]]
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"recipe": bad, "models_dir": str(tiny_dir), "axes": STAGED_AXES}))
    with pytest.raises(ConfigError, match=r"stage pair-[0-9a-f]{12}: .*mistral-nope"):
        prepare(spec, tmp_path / "out")
    spec.write_text(yaml.safe_dump({"recipe": STAGED, "models_dir": str(tiny_dir), "axes": STAGED_AXES}))
    prep = prepare(spec, tmp_path / "out")
    assert prep.planned is None and len(prep.variants) == 4 and not (tmp_path / "out").exists()
