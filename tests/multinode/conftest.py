"""Several real Ray nodes on one machine (``ray.cluster_utils.Cluster``, as Ray's own Train
tests do): a head with no CPUs, which is never removed and runs only the drivers, and
worker nodes of 1 CPU each, every one its own raylet and object store. A node killed with
``remove_node(node, allow_graceful=False)`` dies as a preempted machine would (SIGKILL).

One cluster per test module (each start costs seconds; keep multi-node tests together):
the session's single-node Ray is shut down first and started again afterwards, so the
tests after these still have it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

WORKER_NODES = 3  # 2 for the Train workers (1 CPU each), 1 for Ray Data's tasks
NODE_STORE = 200 << 20  # object store per node


@dataclass
class LocalCluster:
    """The cluster, its worker nodes (by Ray node id) and the head's node id."""

    cluster: Any
    head: str
    nodes: dict[str, Any] = field(default_factory=dict)

    def add(self, **resources: float) -> str:
        node = self.cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE, resources=resources or None)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        return node.node_id

    def kill(self, node_id: str) -> None:
        """SIGKILL every process of a worker node (no graceful drain), as a preemption does."""
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)

    def alive(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != self.head]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from effray.cluster import init_ray
    from effray.data.pipeline import use_ray_data_env

    had_local = ray.is_initialized()
    ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    port = _free_port()
    # every process of this cluster asks its own dashboard (see effray.cluster.init_ray), and
    # Ray Train notices a dead worker within a second
    os.environ.update(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1")
    use_ray_data_env()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": NODE_STORE, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": port})  # fmt: skip
    local = LocalCluster(c, head=c.head_node.node_id)
    for i in range(WORKER_NODES):
        local.add(**{f"effray_node_{i}": 1.0})
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield local
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if had_local:  # the session's own local Ray, for the tests that come after
            init_ray(num_cpus=2, log_to_driver=False)
