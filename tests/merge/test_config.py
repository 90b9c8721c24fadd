"""Recipe schema: the seeds' recipe parses, and bad recipes get one message naming fields.

That every file in configs/ validates is checked in tests/test_configs.py (recipes) and
tests/sweep/test_variants.py (sweep specs)."""

from pathlib import Path

import pytest
import yaml

from mergeserve.errors import ConfigError
from mergeserve.merge.config import load_config, parse_config


def test_seed_recipe_parses_filters_and_gradients():
    cfg, _ = load_config(Path(__file__).parents[2] / "configs/seeds/marcoro14-7b-slerp.yaml")
    t = cfg.parameters["t"]
    assert [f.filter for f in t] == ["self_attn", "mlp", None]
    assert t[0].value == [0, 0.5, 0.3, 0.7, 1]
    assert cfg.slices[0].sources[1].layer_range == (0, 32)
    assert str(cfg.base_model) == "AIDC-ai-business/Marcoroni-7B-v3"


def test_model_reference_forms():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "org/m@v1.0+org/lora"}]})
    ref = cfg.models[0].model
    assert (ref.path, ref.revision, ref.lora) == ("org/m", "v1.0", "org/lora")


def test_all_problems_reported_at_once_with_field_names():
    bad = {
        "merge_methd": "slerp",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 8]}, {"model": "b", "layer_range": [4, 8]}]},
            {"sources": [{"model": "a", "layer_range": [5, 3]}]},
        ],
        "parameters": {"t": []},
        "dtype": "bf17",
    }
    with pytest.raises(ConfigError) as ei:
        parse_config(bad)
    msg = str(ei.value)
    assert "\n" not in msg
    for needle in ["merge_method", "merge_methd: unknown field", "slices[0]", "lengths differ",
                   "slices[1].sources[0].layer_range", "empty gradient", "dtype"]:
        assert needle in msg, needle
    assert len(ei.value.problems) >= 6


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"merge_method": "linear"}, "exactly one of 'models' or 'slices'"),
        ({"merge_method": "linear", "models": [], }, "'models' is empty"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "base",
          "tokenizer": {"source": "base"}}, "not both"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": []}}]}, "empty gradient"),
        ({"merge_method": "linear", "models": [{"model": "a", "weights": 1}]}, "models[0].weights: unknown field"),
    ],
)
def test_structural_errors(data, needle):
    with pytest.raises(ConfigError, match=None) as ei:
        parse_config(data)
    assert needle in str(ei.value)


def test_yaml_round_trip_is_stable():
    cfg, _ = load_config(Path(__file__).parents[2] / "configs/seeds/linear-0.7-0.3.yaml")
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
