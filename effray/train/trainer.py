"""The ``TorchTrainer`` every stage fits (train, compress, the GAN), and what it needs.

Resources are resolved and checked on the driver before a worker starts (Ray would wait
forever for resources the cluster lacks); the trainer's run is named so a re-run restores
it; a worker's :class:`~effray.errors.EffrayError` comes back to the driver as itself; and
rank 0 hands the driver what Ray Train's metrics don't carry through a mailbox actor
(:mod:`effray.mailbox`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from effray.cluster import temporary_env
from effray.config import AUTO, require, require_whole_gpus
from effray.data.clock import kill_clock
from effray.errors import EffrayError
from effray.train.checkpoint import read_payload
from effray.train.config import TrainConfig, parse_resources


def fit_cpus_per_worker(cfg: Any, total: dict[str, float], nodes: list[dict[str, float]]) -> Any:
    """``cfg`` with ``--cpus-per-worker auto`` resolved for this cluster: on CPUs, its CPUs
    less one Ray Data task's, split over the workers (at most one node's CPUs, in quarter
    CPUs); on GPUs, the CPUs per GPU of the scarcest GPU node times a worker's GPUs. So
    ``effray train --workers 2`` fits a 2-core laptop as it fits a GPU cluster."""
    if cfg.cpus_per_worker != AUTO:
        return cfg
    cpus = float(total.get("CPU", 0))
    if cfg.gpus_per_worker > 0:
        ratios = [n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU", 0) > 0] or [
            cpus / max(total.get("GPU", 1), 1)
        ]
        per = min(ratios) * cfg.gpus_per_worker
    else:
        per = (cpus - cfg.data_cpus) / cfg.workers
        per = min(per, max((n.get("CPU", 0) for n in nodes), default=per))
    per = math.floor(per * 4) / 4
    require(
        per > 0,
        f"--workers {cfg.workers} and --data-cpus {cfg.data_cpus:g} leave no CPU of the cluster's {cpus:g} "
        "for a worker; use fewer workers or a lower --data-cpus",
    )
    return dataclasses.replace(cfg, cpus_per_worker=per)


def check_resources(cfg: TrainConfig, total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Fail in one line when the cluster can't ever hold the workers (plus one Ray Data
    task), instead of letting Ray wait for them forever."""
    w = cfg.workers
    require_whole_gpus(w, cfg.gpus_per_worker)
    have_gpu = float(total.get("GPU", 0))
    need_gpu = w * cfg.gpus_per_worker
    require(
        need_gpu <= have_gpu,
        f"--workers {w} x --gpus-per-worker {cfg.gpus_per_worker:g} needs {need_gpu:g} GPUs, the cluster has "
        f"{have_gpu:g}; "
        "lower them (--gpus-per-worker 0 trains on CPUs) or add GPU nodes",
    )
    have_cpu = float(total.get("CPU", 0))
    need_cpu = w * cfg.cpus_per_worker + cfg.data_cpus
    require(
        need_cpu <= have_cpu,
        f"--workers {w} x --cpus-per-worker {cfg.cpus_per_worker:g} + --data-cpus {cfg.data_cpus:g} (one Ray Data "
        "task) "
        f"needs {need_cpu:g} CPUs, the cluster has {have_cpu:g}; lower them",
    )
    if nodes:
        require(
            any(n.get("CPU", 0) >= cfg.cpus_per_worker and n.get("GPU", 0) >= cfg.gpus_per_worker for n in nodes),
            f"no node has {cfg.cpus_per_worker:g} CPUs and {cfg.gpus_per_worker:g} GPUs for one worker; "
            "lower --cpus-per-worker/--gpus-per-worker",
        )
        wanted = getattr(cfg, "worker_resources", "")  # train only; compress and the GAN have none
        extra = parse_resources(wanted)
        require(
            not extra or any(all(n.get(k, 0) >= v for k, v in extra.items()) for n in nodes),
            f"no node offers --worker-resources {wanted}; start nodes with `ray start --resources` "
            "naming them, or drop the flag",
        )


def _user_error(exc: BaseException) -> EffrayError | None:
    for failure in getattr(exc, "worker_failures", {}).values():
        seen = failure
        while seen is not None:
            if isinstance(seen, EffrayError):
                return seen
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def torch_trainer(
    loop: Any,
    loop_config: dict[str, Any],
    *,
    workers: int | tuple[int, int],
    cpus_per_worker: float,
    gpus_per_worker: float,
    name: str,
    storage: str,
    max_failures: int,
    datasets: dict[str, Any],
    keep_checkpoints: int | None = None,
    dataset_config: Any = None,
    callbacks: list[Any] | None = None,
    extra_resources: dict[str, float] | None = None,
    grow_check_s: float = 30.0,
) -> Any:
    """The ``TorchTrainer`` every stage runs (train, compress, the GAN): NCCL when the
    workers get GPUs, gloo otherwise; ``RunConfig(name, storage)`` so a re-run restores;
    with ``keep_checkpoints`` the newest N (not the best: resuming and the corrupt-newest
    fallback need the latest). ``workers=(min, max)``: Ray Train V2's elastic world size,
    looking for room to grow every ``grow_check_s`` (Ray Train's default: 60 s)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {}), **(extra_resources or {})}
    checkpoints = (
        None
        if keep_checkpoints is None
        else CheckpointConfig(
            num_to_keep=keep_checkpoints, checkpoint_score_attribute="epoch", checkpoint_score_order="max"
        )
    )
    extra = {"dataset_config": dataset_config} if dataset_config is not None else {}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            **({"elastic_resize_monitor_interval_s": grow_check_s} if isinstance(workers, tuple) else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoints,
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        **extra,
    )


WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train hands it to its controller


def fit(trainer: Any, clock: str, env: dict[str, str] | None = None) -> Any:
    """``trainer.fit()``; an ``EffrayError`` raised in a worker comes back as itself (one
    line for the user, not a Ray traceback); the epoch clock actor goes either way.
    ``env``: Ray Train settings its controller reads from the driver's environment at
    ``fit()``, set for this fit only."""

    try:
        with temporary_env(**(env or {})):
            return trainer.fit()
    except Exception as exc:
        user = _user_error(exc)
        if user is not None:
            raise user from None
        raise
    finally:
        kill_clock(clock)


def finished_run(run_path: str, epochs: int) -> tuple[dict[str, Any], str] | None:
    """The metrics and checkpoint of a run at ``run_path`` that already trained ``epochs``
    epochs and whose newest checkpoint loads, from what Ray Train saved
    (``Result.from_path``); None if it has none, is shorter, or that checkpoint is
    unreadable (then the fit resumes, falling back to an older checkpoint)."""
    from ray.train import Result

    try:
        result = Result.from_path(run_path)
    except (RuntimeError, OSError, ValueError, KeyError):  # no run there, or a snapshot of no checkpoints
        return None
    metrics, ckpt = result.metrics or {}, result.checkpoint
    if ckpt is None or int(metrics.get("epoch", 0)) < epochs:
        return None
    try:
        with ckpt.as_directory() as d:  # no copy on local storage
            if int(read_payload(d)["epoch"]) != int(metrics["epoch"]):
                return None
    except EffrayError:
        return None
    return metrics, ckpt.path
