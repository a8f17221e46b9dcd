"""What a trial reserves, whether the cluster can ever place one, and how many run at once.

Tune and Ray Train wait forever for resources the cluster does not have, so a search
that asks for too much is refused in one line before its first trial instead.
"""

from __future__ import annotations

from typing import Any

from effray.config import require
from effray.search.config import TuneConfig

# what a trial that only drives a Ray Train run reserves for itself (Tune can't place a
# trial that asks for nothing, and its workers reserve the real CPUs/GPUs)
DRIVER_CPUS = 0.01


def trial_resources(cfg: TuneConfig) -> dict[str, float]:
    """The resources Tune reserves for one trial's own process."""
    if cfg.workers_per_trial == 1:
        return {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    return {"cpu": DRIVER_CPUS}


def check_trial_resources(cfg: TuneConfig, total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Fail in one line, before any trial starts, when one trial can never be placed
    (Tune and Ray Train would otherwise wait for the resources forever)."""
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    w = cfg.workers_per_trial
    if w == 1:
        require(
            cfg.cpus_per_trial <= cpus and cfg.gpus_per_trial <= gpus,
            f"a trial asks for {cfg.cpus_per_trial:g} CPU / {cfg.gpus_per_trial:g} GPU, the cluster has {cpus:g} / "
            f"{gpus:g}; lower --cpus-per-trial/--gpus-per-trial",
        )
        return
    cpw, gpw = cfg.cpus_per_worker, cfg.gpus_per_worker
    require(
        gpw == 0 or float(gpw).is_integer(),
        f"--workers-per-trial {w} splits --gpus-per-trial {cfg.gpus_per_trial:g} into {gpw:g} GPU per worker; "
        f"DDP on NCCL needs whole GPUs per worker: use --gpus-per-trial {w} (or 0 for CPUs)",
    )
    data = max(cfg.data_cpus, 1.0)  # Ray Data's file reads take a whole CPU whatever --data-cpus says
    need = cfg.cpus_per_trial + data + DRIVER_CPUS
    require(
        need <= cpus and cfg.gpus_per_trial <= gpus,
        f"--workers-per-trial {w} x {cpw:g} CPUs (--cpus-per-trial {cfg.cpus_per_trial:g}) + {data:g} for one "
        f"Ray Data task + {DRIVER_CPUS:g} for the trial needs {need:g} CPUs and {cfg.gpus_per_trial:g} GPUs, "
        f"the cluster has {cpus:g} / {gpus:g}; lower --cpus-per-trial/--gpus-per-trial",
    )
    if nodes:
        require(
            any(n.get("CPU", 0) >= cpw and n.get("GPU", 0) >= gpw for n in nodes),
            f"no node has {cpw:g} CPUs and {gpw:g} GPUs for one of a trial's {w} workers; "
            "lower --cpus-per-trial/--gpus-per-trial",
        )


def concurrency(cfg: TuneConfig, total: dict[str, Any], shared: bool) -> int:
    """Trials at once: ``--max-concurrent``, else what the cluster's CPUs and GPUs hold.
    Trials on shared arrays need nothing else; streaming trials leave one CPU for their
    Ray Data tasks."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    spare = 0 if shared else 1
    by_cpu = int(max(total.get("CPU", 1) - spare, 1) // cfg.cpus_per_trial)
    by_gpu = int(total.get("GPU", 0) // cfg.gpus_per_trial) if cfg.gpus_per_trial else by_cpu
    return max(1, min(by_cpu, by_gpu))
