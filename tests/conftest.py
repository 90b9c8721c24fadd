"""Session-scoped fixtures: the tiny model family (trained locally, cached), random checkpoints, and
a real multi-node Ray cluster on this machine (tests/cluster and tests/sweep)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.serving_fixtures"]  # the served app (session-scoped), for tests/serve and tests/loadtest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MERGESERVE_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def tiny_family():
    """{arch: {"base"|"code"|"prose": Path}} for mistral, llama and qwen2 (built once, cached)."""
    from mergeserve.tiny_models import build_tiny_family

    return build_tiny_family(CACHE / "tiny-family", progress=False)


@pytest.fixture(scope="session")
def tiny_dir(tiny_family) -> Path:
    """The directory the tiny recipes in configs/tiny resolve their model ids under."""
    return Path(tiny_family["mistral"]["base"]).parent


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """Small random Mistral-layout checkpoints: a base and three perturbations of it (a, b, c)."""
    from mergeserve.synthetic import make_random_model

    root = tmp_path_factory.mktemp("random-models")
    base = make_random_model(root / "base", "tiny", seed=1)
    a = make_random_model(root / "ft-a", "tiny", seed=2, noise_of=base)
    b = make_random_model(root / "ft-b", "tiny", seed=3, noise_of=base)
    c = make_random_model(root / "ft-c", "tiny", seed=4, noise_of=base)
    return {"base": base, "a": a, "b": b, "c": c, "root": root}


@pytest.fixture(scope="session")
def ray_cluster():
    """Three nodes with their own resources (1 + 1 + 1 CPUs), joined by this process's driver."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
