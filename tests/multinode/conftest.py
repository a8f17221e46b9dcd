"""Several real Ray nodes on one machine (``ray.cluster_utils.Cluster``, as Ray's own Train
tests do): a head with no CPUs, which is never removed and runs only the drivers, and
worker nodes of 1 CPU each, every one its own raylet and object store. A node killed with
``remove_node(node, allow_graceful=False)`` dies as a preempted machine would (SIGKILL).
The cluster itself is :func:`effray.local_cluster.local_cluster` (the failover benchmark
starts the same one).

One cluster per test module (each start costs seconds; keep multi-node tests together):
the session's single-node Ray is shut down first and started again afterwards, so the
tests after these still have it.
"""

from __future__ import annotations

import pytest

WORKER_NODES = 3  # 2 for the Train workers (1 CPU each), 1 for Ray Data's tasks


@pytest.fixture(scope="module")
def cluster():
    import ray

    from effray.cluster import init_ray
    from effray.local_cluster import local_cluster

    had_local = ray.is_initialized()
    # Ray Train's health check at the interval every other test uses (tests/conftest.py)
    with local_cluster(WORKER_NODES, node_resources=lambda i: {f"effray_node_{i}": 1.0}, health_check_s=0.5) as local:
        yield local
    if had_local:  # the session's own local Ray, for the tests that come after
        init_ray(num_cpus=2, log_to_driver=False)
