"""Multi-stage recipes (mergekit-multi format): the graph, its validation, the runner, and parity
with mergekit-multi run on the same recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mergeserve.cli import main
from mergeserve.errors import ConfigError
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.reader import ModelFiles
from mergeserve.merge.stage_run import merge_stages
from mergeserve.merge.stages import FINAL, load_stages, parse_stages, stage_config
from tests.oracle import absolutize, compare, load_tensors, run_mergekit

# pair and side are independent and share ft-a (merged together: ft-a read once per shard); blend
# reads both; the unnamed final reads pair, blend and a model.
DOCS = [
    {"name": "pair", "merge_method": "linear", "dtype": "bfloat16",
     "models": [{"model": "ft-a", "parameters": {"weight": 0.7}}, {"model": "ft-b", "parameters": {"weight": 0.3}}]},
    {"name": "side", "merge_method": "slerp", "base_model": "ft-a", "dtype": "bfloat16", "parameters": {"t": 0.35},
     "models": [{"model": "ft-a"}, {"model": "ft-c"}]},
    {"name": "blend", "merge_method": "slerp", "base_model": "pair", "dtype": "bfloat16", "parameters": {"t": 0.6},
     "models": [{"model": "pair"}, {"model": "side"}]},
    {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
     "models": [{"model": "pair", "parameters": {"weight": 0.5, "density": 0.6}},
                {"model": "blend", "parameters": {"weight": 0.4, "density": 0.6}},
                {"model": "ft-c", "parameters": {"weight": 0.3, "density": 0.6}}]},
]
NAMES = ("pair", "side", "blend")


def _text(docs) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def test_graph_order_final_and_description():
    # documents out of order: the final first, then a stage used by an earlier one
    g = parse_stages(_text(DOCS[::-1]))
    assert [s.name for s in g.stages] == ["pair", "side", "blend", FINAL] and g.final == FINAL
    assert g[FINAL].deps == ("pair", "blend") and g["blend"].deps == ("pair", "side")
    text = g.describe()
    assert "4 stages" in text and "reads stages: pair, blend" in text and "written to the output" in text


def test_without_an_unnamed_document_the_only_unused_stage_is_final():
    g = parse_stages(_text(DOCS[:3]))
    assert g.final == "blend"


def test_every_graph_problem_is_reported_at_once():
    docs = [
        {"name": "a", "merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]},  # itself
        {"name": "b", "merge_method": "linear", "models": [{"model": "c", "parameters": {"weight": 1}}]},
        {"name": "c", "merge_method": "linear", "models": [{"model": "b+lora", "parameters": {"weight": 1}}]},  # cycle b-c
        {"name": "b", "merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},  # duplicate
        {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},
        {"merge_method": "linear", "models": [{"model": "y", "parameters": {"weight": 1}}], "slerp_t": 1},  # 2nd unnamed, bad field
    ]
    with pytest.raises(ConfigError) as e:
        parse_stages(_text(docs))
    msg = str(e.value)
    for part in ("stage a: refers to itself", "cycle: b -> c -> b", "duplicate stage name 'b'", "2 documents have no name",
                 "document 6 (unnamed): slerp_t: unknown field"):
        assert part in msg, msg


def test_references_are_rewritten_to_stage_outputs(tmp_path):
    docs = [DOCS[0], {"merge_method": "linear", "base_model": "pair", "tokenizer_source": "pair",
                      "models": [{"model": "pair+adapter", "parameters": {"weight": 1}}, {"model": "ft-c", "parameters": {"weight": 1}}]}]
    g = parse_stages(_text(docs))
    cfg = stage_config(g[FINAL], {"pair": tmp_path / "pair"})
    assert str(cfg.base_model) == str(tmp_path / "pair") and str(cfg.tokenizer_source) == str(tmp_path / "pair")
    assert [str(m.model) for m in cfg.models] == [f"{tmp_path / 'pair'}+adapter", "ft-c"]


def test_self_reference_via_the_cli_is_refused_with_nothing_written(tmp_path, capsys):
    p = tmp_path / "multi.yaml"
    p.write_text(_text([{"name": "loop", "merge_method": "linear", "models": [{"model": "loop", "parameters": {"weight": 1}}]},
                        DOCS[-1]]))
    code = main(["merge", str(p), str(tmp_path / "out"), "--local"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "stage loop: refers to itself" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_bad_first_stage_is_found_before_any_work(tmp_path, random_models, capsys):
    docs = [dict(DOCS[0], models=[{"model": "ft-a"}, {"model": "ft-b"}]), *DOCS[1:]]  # linear without weights
    p = tmp_path / "multi.yaml"
    p.write_text(_text(docs))
    code = main(["merge", str(p), str(tmp_path / "out"), "--local", "--models-dir", str(random_models["root"])])
    err = capsys.readouterr().err
    assert code == 2 and "stage pair: parameters.weight" in err and not list(tmp_path.glob("*out*"))


@pytest.fixture(scope="module")
def mergekit_multi(random_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("oracle-stages")
    docs = [absolutize(d, random_models["root"], keep=NAMES) for d in DOCS]
    run_mergekit([(docs, work / "mk")], work)
    return work


def _tensor_bytes(model_dir) -> int:
    f = ModelFiles(model_dir)
    try:
        return sum(f.info(n).nbytes for n in f.tensors)
    finally:
        f.close()


@pytest.mark.slow
def test_final_checkpoint_equals_mergekit_multi_and_shared_inputs_are_read_once(mergekit_multi, random_models, tmp_path):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_text(DOCS))
    out = tmp_path / "out"
    opts = MergeOptions(progress=False, keep_intermediates=True, models_dir=random_models["root"])
    result = merge_stages(load_stages(recipe), out, opts)
    stats = compare(load_tensors(out), load_tensors(mergekit_multi / "mk"))
    assert stats["bitwise_tensors"] == stats["tensors"], stats
    for name in NAMES:  # the intermediates too, kept where --keep-intermediates puts them
        stats = compare(load_tensors(out / "stages" / name), load_tensors(mergekit_multi / "mk-stages" / name))
        assert stats["bitwise_tensors"] == stats["tensors"], (name, stats)
    assert (out / "config.json").exists() and not (out / "stages" / "__final__").exists()
    # pair and side were merged together: ft-a, which both read, was read once
    assert result.groups == [["pair", "side"], ["blend"], [FINAL]]
    assert result.bytes_read == result.bytes_read_one_by_one - _tensor_bytes(random_models["a"]) > 0
    assert "the stages one by one would read" in result.summary()


def test_intermediates_go_through_the_page_cache_and_the_final_does_not(random_models, tmp_path, monkeypatch):
    """The next stage reads an intermediate back at once: it is written buffered (from the page
    cache the read costs no disk time); the final output is written with O_DIRECT."""
    from mergeserve.merge import multi

    seen: dict[str, bool] = {}
    real = multi.shard_writer

    def recording(path, shard, *, direct=True):
        seen[Path(path).parent.name.removeprefix(".").removesuffix(".partial")] = direct  # the stage's staging directory
        return real(path, shard, direct=direct)

    monkeypatch.setattr(multi, "shard_writer", recording)
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_text(DOCS))
    merge_stages(load_stages(recipe), tmp_path / "out", MergeOptions(progress=False, models_dir=random_models["root"]))
    assert seen == {"pair": False, "side": False, "blend": False, "__final__": True}


def test_plan_only_prints_the_dag_and_the_stages_merged_together(random_models, tmp_path, capsys):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_text(DOCS))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--plan-only", "--models-dir", str(random_models["root"])]) == 0
    text = capsys.readouterr().out
    assert "4 stages" in text and "merged together, each input tensor read once per shard: pair, side" in text
    assert not list(tmp_path.glob("*out*"))


class _Interrupt(Exception):
    pass


def test_resume_reuses_verified_stages_and_redoes_the_rest(random_models, tmp_path, monkeypatch):
    import mergeserve.merge.api as api

    graph = parse_stages(_text(DOCS))
    opts = MergeOptions(progress=False, models_dir=random_models["root"])
    merged: list[str] = []
    real = api.merge_together

    def interrupted(planned, options):  # stands in for a kill while the final stage merges
        if planned[0][0].merge_method == "ties":
            raise _Interrupt("killed")
        merged.extend(Path(p[3]).name for p in planned)
        return real(planned, options)

    monkeypatch.setattr(api, "merge_together", interrupted)
    with pytest.raises(_Interrupt):
        merge_stages(graph, tmp_path / "out", opts)
    staged = tmp_path / ".out.partial" / "stages"
    assert merged == ["pair", "side", "blend"] and (staged / "pair").is_dir() and not (tmp_path / "out").exists()

    # a damaged intermediate is detected and merged again; the intact ones are reused
    shard = next((staged / "blend").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    merged.clear()

    def counting(planned, options):
        merged.extend(Path(p[3]).name for p in planned)
        return real(planned, options)

    monkeypatch.setattr(api, "merge_together", counting)
    result = merge_stages(graph, tmp_path / "out", replace(opts, resume=True))
    assert result.reused == ["pair", "side"] and merged == ["blend", "__final__"]
    fresh = merge_stages(graph, tmp_path / "fresh", opts)
    assert not (tmp_path / "out" / "stages").exists()
    got, want = load_tensors(tmp_path / "out"), load_tensors(fresh.out_dir)
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in got)


def test_a_multi_document_recipe_is_read_within_the_yaml_budget(tmp_path, capsys):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    p = tmp_path / "multi.yaml"
    p.write_text(_text(DOCS[:1]) + "---\n" + laughs)
    code = main(["merge", str(p), str(tmp_path / "out"), "--local"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "expands to more than 100,000 nodes" in err, err
    assert not list(tmp_path.glob("*out*"))
