"""What a run needs from the cluster it runs on, checked before any work starts.

Storage every node sees is checked by :mod:`effray.storage` (re-exported here); a Ray
to join or start is :func:`init_ray`.

It also builds the runtime_env for ``ray job submit``: ``cluster/runtime_env.yaml`` plus
secrets such as ``WANDB_API_KEY`` taken from the submitting shell, so that no file ever
holds them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from effray.errors import EffrayError
from effray.storage import (
    URI,
    check_storage_for_cluster,
    local_path,
    nodes_not_seeing,
    storage_error,
)

__all__ = [
    "PASSTHROUGH_ENV",
    "check_output_paths",
    "check_storage_for_cluster",
    "free_port",
    "init_ray",
    "local_path",
    "nodes_not_seeing",
    "runtime_env",
    "storage_error",
    "temporary_env",
]

# Environment variables that travel from the submitting shell into the job, when set there.
PASSTHROUGH_ENV = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_BASE_URL")


def free_port() -> int:
    """A loopback port nothing listens on now (for a local Ray's dashboard)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temporary_env(**values: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block and put back what was there (Ray
    reads several from the driver's environment when it starts processes)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(*, num_cpus: int | None = None, verbose: bool = False, log_to_driver: bool = True) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``; ``auto``
    joins this machine's ``ray start`` cluster), or start a private local one.

    A local instance gets its dashboard on a free loopback port, and
    ``RAY_API_SERVER_ADDRESS`` names it for every process of this instance (the raylet,
    and so every worker, inherits the environment). Ray Train V2's detached
    PlacementGroupCleaner asks the state API whether the Train controller is alive; with
    no address it asks the *newest* Ray instance on the machine, so while any other Ray
    with a dashboard runs here (a notebook, a second effray command) it finds no such
    actor, declares the controller dead and removes the workers' placement group,
    killing healthy training (seen here: a 30-minute run restarted after 2 minutes).
    Without a dashboard every query fails and it logs a warning every few seconds.
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=log_to_driver)
    else:
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=level,
            log_to_driver=log_to_driver,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


# Set by Ray's job supervisor in the environment of every `ray job submit` entrypoint.
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Config fields that name where a command writes; checked wherever they sit in a nested config.
OUTPUT_FIELDS = ("out", "storage")


def check_output_paths(cfg: Any, environ: Mapping[str, str]) -> None:
    """Refuse a relative output path inside a Ray job.

    ``ray job submit --working-dir .`` runs the entrypoint in a temporary copy of the
    working dir on the cluster; a relative ``--out``/``--storage`` lands there and is
    deleted with it, so a finished job would leave nothing. Raises :class:`EffrayError`
    (one line naming the flag and the fix) for such a path in ``cfg`` or its nested
    configs; outside a job, or for absolute paths and URIs, does nothing."""
    if JOB_ENV_VAR not in environ:
        return
    for name, value in _fields(cfg):
        if (
            name in OUTPUT_FIELDS
            and isinstance(value, str)
            and value
            and URI.match(value) is None
            and not os.path.isabs(os.path.expanduser(value))
        ):
            flag = "--" + name.replace("_", "-")
            raise EffrayError(
                f"{flag} {value} is a relative path, and under `ray job submit` it would land in the job's "
                f"temporary working dir and be deleted with it; pass an absolute path on shared storage "
                f"(e.g. /mnt/effray/{value.strip('./') or 'out'}) or s3://BUCKET/PATH"
            )


def _fields(cfg: Any) -> list[tuple[str, Any]]:
    import dataclasses

    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        value = getattr(cfg, f.name)
        out.extend(_fields(value) if dataclasses.is_dataclass(value) else [(f.name, value)])
    return out


def runtime_env(
    spec: str | os.PathLike, environ: Mapping[str, str], passthrough: tuple[str, ...] = PASSTHROUGH_ENV
) -> dict[str, Any]:
    """``spec`` (``cluster/runtime_env.yaml``) with the ``passthrough`` variables set in
    ``environ`` added to its ``env_vars``: the dict for ``ray job submit --runtime-env-json``.

    Ray itself expands ``${VAR}`` in ``env_vars`` on the cluster, from the cluster's
    environment, not the submitter's; this is how a secret in the submitting shell reaches
    the job without being written to a file.
    """
    import yaml

    env = yaml.safe_load(Path(spec).read_text()) or {}
    env_vars = dict(env.get("env_vars") or {})
    env_vars.update({k: environ[k] for k in passthrough if environ.get(k)})
    if env_vars:
        env["env_vars"] = env_vars
    return env


# ------------------------------------------------------------------ a launcher config's capacity


def launcher_node_types(path: str | os.PathLike) -> dict[str, tuple[dict[str, float], int]]:
    """``{node type: (resources, most nodes of it)}`` of a Ray cluster launcher YAML
    (``cluster.yaml``): the head type counts once, a worker type ``max_workers`` times.
    Each type must state its ``resources`` (CPU, GPU) for the check to mean anything."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    types = doc.get("available_node_types") or {}
    out: dict[str, tuple[dict[str, float], int]] = {}
    for name, spec in types.items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if "CPU" not in res:
            raise EffrayError(
                f"{path}: node type {name} states no resources.CPU; write its CPUs (and GPUs) so "
                "effray can check what fits"
            )
        count = 1 if name == doc.get("head_node_type") else int(spec.get("max_workers", doc.get("max_workers", 0)))
        out[name] = (res, count)
    return out


def bundles_that_fit(bundle: Mapping[str, float], node_types: Mapping[str, tuple[dict[str, float], int]]) -> int:
    """How many copies of a resource ``bundle`` (``{"CPU": c, "GPU": g}``) the cluster holds
    at its largest, each copy on one node."""
    total = 0
    for res, count in node_types.values():
        per_node = min((int(res.get(k, 0.0) // v) for k, v in bundle.items() if v > 0), default=0)
        total += per_node * count
    return total


def fit_problems(
    requests: Mapping[str, tuple[Mapping[str, float], int]], node_types: Mapping[str, tuple[dict[str, float], int]]
) -> list[str]:
    """One line per request ``{what: (bundle, copies)}`` that the cluster can't hold even
    at its largest (each request alone: the stages run one after another)."""
    problems = []
    for what, (bundle, copies) in requests.items():
        room = bundles_that_fit(bundle, node_types)
        if room < copies:
            want = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
            problems.append(f"{what} needs {copies} x ({want}) on one node each; the cluster holds {room} at most")
    return problems
