"""``effray tune``: Ray Tune over the compression space, from one teacher to measured trials.

Each trial compresses the teacher with one sampled :class:`CompressConfig`, reports
validation accuracy after every fine-tuning epoch (so ASHA can stop poor trials), and
ends with one ``final`` report holding the full measurement of the saved artifact,
which it keeps as the trial's checkpoint. The experiment resumes when the same command
runs again with the same ``--storage``/``--name``: finished trials are kept, errored
ones are retried.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.atomic import write_json
from effray.compress.config import CompressConfig
from effray.config import from_dict, merge, option, require, to_dict
from effray.errors import EffrayError

SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")
METRIC = "val_accuracy"


@dataclass(frozen=True)
class TuneConfig:
    """The search: what to compress, over which space, with how much of the cluster."""

    teacher: str = option("", "teacher checkpoint (a run directory or its model.pt)")
    data: str = option("", "prepared dataset directory (its val split scores every trial)")
    space: str = option("demo", "search space: a preset (demo, cifar10) or a YAML file of CompressConfig fields")
    num_samples: int = option(8, "trials to sample (with --search grid: repeats of the grid)")
    search: str = option("random", "search algorithm (optuna needs `pip install effray[optuna]`)", choices=SEARCHERS)
    multi_objective: bool = option(False, "optuna only: maximise accuracy and minimise bytes together")
    scheduler: str = option("asha", "early stopping of poor trials", choices=SCHEDULERS)
    grace_period: int = option(1, "ASHA: epochs every trial runs before it can be stopped")
    max_concurrent: int = option(0, "trials at once (0 = what the cluster's CPUs/GPUs allow, leaving one CPU for Ray Data)")
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial")
    gpus_per_trial: float = option(0.0, "GPUs reserved per trial")
    augment: str = option("standard", "augmentation policy of the fine-tuning stream")
    eval_batch_size: int = option(256, "batch size for validation and calibration")
    seed: int = option(0, "seed of the search and of every trial's data stream")
    storage: str = option("runs/tune", "experiment storage path (shared or cloud storage on a multi-node cluster)")
    name: str = option("compress", "experiment name; re-running the same name resumes it")
    max_failures: int = option(1, "retries of a trial that errored")

    def validate(self) -> None:
        require(bool(self.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent >= 0, f"--max-concurrent must be >= 0, got {self.max_concurrent}")
        require(self.cpus_per_trial > 0 and self.gpus_per_trial >= 0, "--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        require(not self.multi_objective or self.search == "optuna", "--multi-objective needs --search optuna")
        require(self.grace_period >= 1, f"--grace-period must be >= 1, got {self.grace_period}")


# ------------------------------------------------------------------ the trial


def compression_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: one compression run, reported epoch by epoch."""
    import ray.tune

    from effray.compress.recipe import compress_local
    from effray.compress.run import eval_and_calib, xy_batches
    from effray.data.pipeline import (
        DataConfig,
        kill_clock,
        torch_batches,
        train_dataset,
    )
    from effray.data.prepare import load_meta
    from effray.evaluate import load_checkpoint

    ctx = config["context"]
    cfg = merge(from_dict(CompressConfig, ctx["base"]), config["compress"])
    trial = ray.tune.get_context().get_trial_id()
    teacher, payload = load_checkpoint(ctx["teacher"])
    meta = load_meta(ctx["data"])
    data_cfg = DataConfig(data=ctx["data"], augment=ctx["augment"], seed=ctx["seed"])
    clock = f"tune-{ctx['name']}-{trial}"
    train_ds = train_dataset(data_cfg, clock=clock)
    bs = cfg.finetune_batch_size

    def train_batches(epoch: int) -> Any:
        return xy_batches(torch_batches(train_ds, meta, bs, clock=clock, epoch=epoch,
                                      shuffle_buffer=data_cfg.shuffle_buffer, seed=ctx["seed"]))  # fmt: skip

    evals, _, calib = eval_and_calib(ctx["data"], meta, ctx["eval_batch_size"], cfg.calib_batches)

    def on_epoch(epoch: int, model: Any) -> None:
        from effray.compress.measure import accuracy

        acc, _ = accuracy(model, evals)
        ray.tune.report({METRIC: acc, "epoch": epoch + 1, "final": False})

    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = compress_local(teacher, cfg, train_batches, calib, evals, tmp,
                                    teacher_info=ctx["teacher_info"], data=ctx["data_info"],
                                    teacher_metrics=ctx["teacher_metrics"], on_epoch=on_epoch,
                                    steps_per_epoch=max(1, -(-meta["counts"]["train"] // bs)),
                                    log=lambda line: None)  # fmt: skip
            student = result["student"]
            final = {
                METRIC: student["accuracy"], "accuracy": student["accuracy"], "bytes": student["bytes"],
                "macs": student["macs"], "latency_ms": student["latency_ms_b1"],
                "latency_ms_b256": student.get("latency_ms_b256"), "params": student["params"],
                "nonzero_params": student["nonzero_params"], "int8_latency_ms": student.get("int8_latency_ms_b1"),
                "int8_speedup_b256": student.get("int8_speedup_b256"),
                **{f"ratio_{k}": v for k, v in student.get("vs_teacher", {}).items()},
                "epoch": cfg.finetune_epochs + 1, "final": True,
            }  # fmt: skip
            ray.tune.report(final, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    finally:
        kill_clock(clock)


# ------------------------------------------------------------------ the driver


def _write_json(path: Path, data: dict[str, Any]) -> None:
    if "://" not in str(path):  # cloud storage: the trials' own results carry the ratios
        write_json(path, data)


def _teacher_context(cfg: TuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Load and measure the teacher once, on the driver, for every trial's ratios."""
    from effray.compress.run import eval_and_calib, teacher_baseline
    from effray.evaluate import load_checkpoint

    teacher, _ = load_checkpoint(cfg.teacher)
    spec = dict(teacher.spec)
    require(spec["num_classes"] == meta["num_classes"],
            f"teacher {cfg.teacher} predicts {spec['num_classes']} classes, {cfg.data} has {meta['num_classes']}; use the dataset it was trained on")  # fmt: skip
    evals, _, _ = eval_and_calib(cfg.data, meta, cfg.eval_batch_size, 1)
    metrics, info = teacher_baseline(teacher, cfg.teacher, evals)
    return {"teacher": str(cfg.teacher), "teacher_metrics": metrics, "teacher_info": info}


def _concurrency(cfg: TuneConfig) -> int:
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = ray.cluster_resources()
    by_cpu = int(max(total.get("CPU", 1) - 1, 1) // cfg.cpus_per_trial)
    by_gpu = int(total.get("GPU", 0) // cfg.gpus_per_trial) if cfg.gpus_per_trial else by_cpu
    return max(1, min(by_cpu, by_gpu))


def _searcher(cfg: TuneConfig) -> Any:
    if cfg.search != "optuna":
        return None
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise EffrayError("--search optuna needs Optuna: pip install 'effray[optuna]' (or optuna)") from None
    if cfg.multi_objective:
        return OptunaSearch(metric=["accuracy", "bytes"], mode=["max", "min"], seed=cfg.seed)
    return OptunaSearch(metric=METRIC, mode="max", seed=cfg.seed)


def tune_compression(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or resume) the search; returns the experiment path and a summary."""
    import ray
    from ray import tune

    from effray.data.pipeline import validate_data_dir
    from effray.search.space import has_grid, load_space, to_param_space
    from effray.train.checkpoint import data_summary

    meta = validate_data_dir(cfg.data)
    space = load_space(cfg.space)
    require(cfg.search == "grid" or not has_grid(space), "the space has grid entries; use --search grid (or choice instead of grid)")
    cpus = ray.cluster_resources().get("CPU", 0)
    require(cfg.cpus_per_trial <= cpus and cfg.gpus_per_trial <= ray.cluster_resources().get("GPU", 0),
            f"a trial asks for {cfg.cpus_per_trial} CPU / {cfg.gpus_per_trial} GPU, the cluster has {cpus:g} / "
            f"{ray.cluster_resources().get('GPU', 0):g}; lower --cpus-per-trial/--gpus-per-trial")  # fmt: skip
    context = {**_teacher_context(cfg, meta), "data": os.path.abspath(cfg.data), "augment": cfg.augment,
               "seed": cfg.seed, "eval_batch_size": cfg.eval_batch_size, "name": cfg.name,
               "base": to_dict(CompressConfig(teacher=str(cfg.teacher))),
               "data_info": data_summary(meta)}  # fmt: skip
    storage = os.path.abspath(cfg.storage) if "://" not in cfg.storage else cfg.storage
    path = os.path.join(storage, cfg.name)
    trainable = tune.with_resources(tune.with_parameters(compression_trial),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})  # fmt: skip
    param_space = {**to_param_space(space), "context": context}
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
        resumed = True
    else:
        scheduler = None
        if cfg.scheduler == "asha":
            scheduler = tune.schedulers.ASHAScheduler(metric=METRIC, mode="max", time_attr="epoch",
                                                      grace_period=cfg.grace_period, max_t=10_000,
                                                      reduction_factor=2)  # fmt: skip
        searcher = _searcher(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=cfg.num_samples, search_alg=searcher, scheduler=scheduler,
                max_concurrent_trials=_concurrency(cfg), trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(name=cfg.name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0),
        )  # fmt: skip
        resumed = False
    _write_json(Path(path) / "teacher.json", context["teacher_metrics"])
    grid = tuner.fit()
    finished = sum(1 for r in grid if r.error is None)
    return {"experiment": path, "trials": len(grid), "finished": finished,
            "errored": len(grid) - finished, "resumed": resumed,
            "teacher": context["teacher_metrics"]}  # fmt: skip
