"""Medium-size random models whose merges take long enough to interrupt."""

from __future__ import annotations

import pytest

from mergeserve.synthetic import Shape, make_random_model

# ~50M parameters: 8 layers, 100 MB bf16 per model. Large enough that a ties merge (an argsort
# per tensor) runs for seconds, small enough for CI.
MEDIUM = Shape("mistral", 1024, 8, 2048, 8, 2, 8192)


@pytest.fixture(scope="session")
def medium_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium-models")
    base = make_random_model(root / "base", MEDIUM, seed=11)
    make_random_model(root / "ft-a", MEDIUM, seed=12, noise_of=base)
    make_random_model(root / "ft-b", MEDIUM, seed=13, noise_of=base)
    return root
