"""Storage every node sees: checked before any work starts.

Multi-node training writes checkpoints from whichever node holds rank 0 and restores
them anywhere, and ``data prepare`` and ``compress`` write from several nodes too, so
their storage must be one every node sees: a cloud URI (``s3://``, ``gs://``) or a shared
filesystem (NFS, EFS, Filestore) mounted at the same path on every node. A node-local path
on a multi-node cluster loses files silently; this module turns that into one clear error.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from effray.errors import EffrayError

URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PROBE_TIMEOUT_S = 60.0


def local_path(storage: str) -> Path | None:
    """The filesystem path behind ``storage``, or None for a remote URI (``s3://``, ``gs://``, ...)."""
    m = URI.match(storage)
    if m is None:
        return Path(storage).expanduser().absolute()
    if m.group(1).lower() == "file":
        return Path(storage[len("file://") :]).absolute()
    return None


def check_storage_for_cluster(storage: str) -> None:
    """Fail early when a multi-node Ray cluster is given storage that only one node sees.

    Call on the driver, after ``ray.init()``. A remote URI passes unchecked; a local path
    passes on a one-node cluster, and on a multi-node cluster only when a marker file the
    driver writes there is visible from every alive node (one zero-CPU task per node), as
    it is on an NFS/EFS mount. Raises :class:`EffrayError` (one line) otherwise.
    """
    path = local_path(storage)
    if path is None:
        return
    import ray

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    blind = nodes_not_seeing(path, nodes)
    if blind:
        raise EffrayError(storage_error(storage, blind, len(nodes)))


def storage_error(storage: str, blind: list[str], num_nodes: int) -> str:
    """The one-line message for a ``storage`` path that the nodes ``blind`` can't see."""
    names = ", ".join(n[:8] for n in blind[:3]) + (f" and {len(blind) - 3} more" if len(blind) > 3 else "")
    return (
        f"--storage {storage} is local to one node, but this Ray cluster has {num_nodes} nodes and "
        f"node(s) {names} can't see it, so their checkpoints would be lost; use s3://BUCKET/PATH, "
        f"gs://BUCKET/PATH or a shared filesystem (NFS) mounted at the same path on every node"
    )


def nodes_not_seeing(path: Path, nodes: list[str], timeout_s: float = _PROBE_TIMEOUT_S) -> list[str]:
    """The node ids among ``nodes`` that don't see a marker file written under ``path`` here.

    A node that doesn't answer within ``timeout_s`` (busy, dying) is not counted: the
    check exists to catch a wrong path, not to police a flaky node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / f".effray-shared-check-{uuid.uuid4().hex[:12]}"
        marker.write_text("written by effray.cluster.check_storage_for_cluster; safe to delete\n")
    except OSError as exc:
        raise EffrayError(
            f"--storage {path} is not writable ({exc.strerror}); choose a directory you can write or an s3:// / "
            "gs:// URI"
        ) from exc
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        refs = {
            node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(marker)
            )
            for node in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        return [node for node, ref in refs.items() if ref in done and not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
