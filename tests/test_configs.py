"""Every recipe in configs/ validates: the seeds' real-id recipes by schema (the 7B models are
not on this machine), their tiny versions fully, against the tiny family."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeserve.merge.api import validate
from mergeserve.merge.config import load_config

REPO = Path(__file__).resolve().parents[1]
ALL = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts)  # sweeps: tests/sweep
TINY = sorted((REPO / "configs" / "tiny").glob("*.yaml"))


def test_configs_exist():
    assert len(list((REPO / "configs" / "seeds").glob("*.yaml"))) >= 5 and len(TINY) >= 5


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_recipe_schema(path):
    cfg, _ = load_config(path)
    assert cfg.merge_method


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_validates_against_the_tiny_family(path, tiny_dir):
    plan = validate(path, models_dir=tiny_dir)
    assert plan.num_tensors > 0 and plan.num_layers == 4
