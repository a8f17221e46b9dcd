"""Several real Ray nodes on one machine, for the tests and benchmarks of what happens
across nodes (placement, a node's death, elastic training).

Scaffolding, not a pipeline stage: nothing in effray imports it. It lives in the package
because both ``tests/multinode`` and ``bench/failover.py`` (run as a script, with only
``bench/`` on its path) need it, and the installed package is the one place both import
from without editing ``sys.path``.

``ray.cluster_utils.Cluster``, as Ray's own Train tests use it: a head with no CPUs, which
is never removed and runs only the drivers, and worker nodes of 1 CPU each, every one its
own raylet and object store. :meth:`LocalCluster.kill` removes a node with
``allow_graceful=False``: every process of it gets SIGKILL, as a preempted machine's would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from effray.cluster import free_port, temporary_env

NODE_STORE = 200 << 20  # object store per node: small, the machine holds several


@dataclass
class LocalCluster:
    """The cluster, its worker nodes (by Ray node id) and the head's node id."""

    cluster: Any
    head: str
    nodes: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, **resources: float) -> str:
        """Start one more 1-CPU node (with these custom resources); its node id once it is up
        and Ray Train's elastic sizing counts it."""
        node = self.cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE, resources=resources or None)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        refresh_resource_view()
        return node.node_id

    def kill(self, node_id: str) -> None:
        """SIGKILL every process of a worker node (no graceful drain), as a preemption does."""
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)

    def alive(self) -> list[str]:
        """Node ids of the live worker nodes (not the head)."""
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != self.head]


def refresh_resource_view() -> None:
    """Make Ray's AutoscalingCoordinator (the actor Ray Train's elastic policy asks how many
    workers fit) re-read the cluster now: on its own it does every 20 s, so a node added
    just before an elastic run starts would not count. Called first from this driver, it
    also places the coordinator on the head, which no test removes (it is pinned to the
    node that created it). A no-op without a connection."""
    import ray

    if not ray.is_initialized():
        return
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    ray.get(
        get_or_create_autoscaling_coordinator().get_reserved_resources.remote("effray-local-cluster", recompute=True)
    )


@contextmanager
def local_cluster(
    worker_nodes: int, node_resources: Callable[[int], dict[str, float]] = lambda i: {}, health_check_s: float = 1.0
) -> Iterator[LocalCluster]:
    """A head and ``worker_nodes`` 1-CPU nodes (node ``i`` offering ``node_resources(i)``),
    this process connected to it as a driver. Ray Train notices a dead worker within
    ``health_check_s``; the GCS marks a killed node dead after 3 missed 1-second health
    checks, as Ray's own node-death tests configure it (with its defaults a killed node's
    resources stay counted as free for a long while, and an elastic run sizes its next
    worker group to them). Every process asks this cluster's own dashboard (see
    :func:`effray.cluster.init_ray`). Any Ray this process had is shut down first; the
    environment is restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    port = free_port()
    gcs = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
    with temporary_env(
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=f"{health_check_s:g}"
    ):
        c = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": NODE_STORE,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": port,
                "_system_config": gcs,
            },
        )
        try:
            local = LocalCluster(c, head=c.head_node.node_id)
            for i in range(worker_nodes):
                local.add(**node_resources(i))
            ray.init(address=c.address, log_to_driver=False)
            refresh_resource_view()
            yield local
        finally:
            ray.shutdown()
            c.shutdown()
