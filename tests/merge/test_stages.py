"""Multi-stage recipes (mergekit-multi format): the graph, its validation, the runner, and parity
with mergekit-multi run on the same recipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from mergeserve.cli import main
from mergeserve.errors import ConfigError
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.stage_run import local_runner, merge_stages
from mergeserve.merge.stages import FINAL, parse_stages, stage_config
from tests.oracle import absolutize, compare, load_tensors, run_mergekit

DOCS = [
    {"name": "pair", "merge_method": "linear", "dtype": "bfloat16",
     "models": [{"model": "ft-a", "parameters": {"weight": 0.7}}, {"model": "ft-b", "parameters": {"weight": 0.3}}]},
    {"name": "blend", "merge_method": "slerp", "base_model": "pair", "dtype": "bfloat16", "parameters": {"t": 0.35},
     "models": [{"model": "pair"}, {"model": "ft-c"}]},
    {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
     "models": [{"model": "pair", "parameters": {"weight": 0.5, "density": 0.6}},
                {"model": "blend", "parameters": {"weight": 0.4, "density": 0.6}},
                {"model": "ft-c", "parameters": {"weight": 0.3, "density": 0.6}}]},
]
NAMES = ("pair", "blend")


def _text(docs) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def test_graph_order_final_and_description():
    # documents out of order: the final first, then a stage used by an earlier one
    g = parse_stages(_text([DOCS[2], DOCS[1], DOCS[0]]))
    assert [s.name for s in g.stages] == ["pair", "blend", FINAL] and g.final == FINAL
    assert g[FINAL].deps == ("pair", "blend") and g["blend"].deps == ("pair",)
    text = g.describe()
    assert "3 stages" in text and "reads stages: pair, blend" in text and "written to the output" in text


def test_without_an_unnamed_document_the_only_unused_stage_is_final():
    g = parse_stages(_text(DOCS[:2]))
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
                        DOCS[2]]))
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


@pytest.mark.slow
def test_final_checkpoint_equals_mergekit_multi(mergekit_multi, random_models, tmp_path):
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_text(DOCS))
    out = tmp_path / "out"
    code = main(["merge", str(recipe), str(out), "--local", "-q", "--keep-intermediates", "--models-dir", str(random_models["root"])])
    assert code == 0
    stats = compare(load_tensors(out), load_tensors(mergekit_multi / "mk"))
    assert stats["bitwise_tensors"] == stats["tensors"], stats
    for name in NAMES:  # the intermediates too, kept where --keep-intermediates puts them
        stats = compare(load_tensors(out / "stages" / name), load_tensors(mergekit_multi / "mk-stages" / name))
        assert stats["bitwise_tensors"] == stats["tensors"], (name, stats)
    assert (out / "config.json").exists() and not (out / "stages" / "__final__").exists()


class _Interrupt(Exception):
    pass


def test_resume_reuses_verified_stages_and_redoes_the_rest(random_models, tmp_path):
    graph = parse_stages(_text(DOCS))
    opts = MergeOptions(progress=False, models_dir=random_models["root"])
    runner = local_runner(opts)
    ran: list[str] = []

    def failing(cfg, dest):
        if cfg.merge_method == "ties":
            raise _Interrupt("killed")
        ran.append(dest.name)
        return runner(cfg, dest)

    failing.options = runner.options
    with pytest.raises(_Interrupt):
        merge_stages(graph, tmp_path / "out", failing, opts)
    staged = tmp_path / ".out.partial" / "stages"
    assert ran == ["pair", "blend"] and (staged / "pair").is_dir() and not (tmp_path / "out").exists()

    # a damaged intermediate is detected and merged again; the intact one is reused
    shard = next((staged / "blend").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ran.clear()

    def counting(cfg, dest):
        ran.append(dest.name)
        return runner(cfg, dest)

    counting.options = runner.options
    result = merge_stages(graph, tmp_path / "out", counting, replace(opts, resume=True))
    assert result.reused == ["pair"] and ran == ["blend", "__final__"]
    fresh = merge_stages(graph, tmp_path / "fresh", runner, opts)
    assert not (tmp_path / "out" / "stages").exists()
    got, want = load_tensors(tmp_path / "out"), load_tensors(fresh.out_dir)
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in got)
