"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), once per session,
and medium-size random models whose merges take long enough to interrupt."""

from __future__ import annotations

import pytest

from mergeserve.synthetic import Shape, make_random_model

# ~50M parameters: 8 layers, 100 MB bf16 per model. Large enough that a ties merge (an argsort
# per tensor) runs for seconds, small enough for CI.
MEDIUM = Shape("mistral", 1024, 8, 2048, 8, 2, 8192)


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


@pytest.fixture(scope="session")
def medium_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium-models")
    base = make_random_model(root / "base", MEDIUM, seed=11)
    make_random_model(root / "ft-a", MEDIUM, seed=12, noise_of=base)
    make_random_model(root / "ft-b", MEDIUM, seed=13, noise_of=base)
    return root
