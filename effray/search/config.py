"""``effray tune``'s settings: what to compress, over which space, with how much of the cluster.

One frozen dataclass is the CLI's flags, the preset section ``effray run`` fills in and
the summary run's wandb config; the space itself (which :class:`CompressConfig` fields a
trial samples) is :mod:`effray.search.space`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from effray.config import option, require
from effray.data.corrupt import parse_corruptions, parse_severities
from effray.search.constraints import Constraints
from effray.search.deployed import DEPLOY_CHOICES, DeploySpec, parse_targets
from effray.train.config import WANDB_MODES

SEARCHERS = ("auto", "random", "grid", "optuna")
SCHEDULERS = ("pareto", "asha", "none")
OBJECTIVES = ("bytes", "macs", "latency")
METRIC = "val_accuracy"  # what every epoch reports and every scheduler and searcher ranks by


@dataclass(frozen=True)
class TuneConfig:
    """The search: what to compress, over which space, with how much of the cluster."""

    teacher: str = option("", "teacher checkpoint (a run directory or its model.pt)")
    data: str = option("", "prepared dataset directory (its val split scores every trial)")
    space: str = option("demo", "search space: a preset (demo, cifar10) or a YAML file of CompressConfig fields")
    num_samples: int = option(8, "trials to sample (with --search grid: repeats of the grid)")
    search: str = option(
        "auto",
        "search algorithm: auto (grid when the space has grid entries, else random), random, grid or optuna "
        "(needs `pip install effray[optuna]`)",
        choices=SEARCHERS,
    )
    multi_objective: bool = option(False, "optuna only: maximise accuracy and minimise bytes together")
    scheduler: str = option(
        "pareto",
        "early stopping: pareto (multi-objective successive halving: a trial stops only when dominated in accuracy "
        "and cost), asha (Ray's, on accuracy alone) or none",
        choices=SCHEDULERS,
    )
    objective: str = option(
        "bytes",
        "the cost the pareto scheduler weighs against accuracy: bytes, MACs, or latency (batch 1 on --deploy's "
        "runtime: measured on the trial's export once its weights are final, estimated from MACs before)",
        choices=OBJECTIVES,
    )
    grace_period: int = option(1, "epochs every trial runs before it can be stopped")
    reduction_factor: float = option(
        3.0, "successive halving: rungs every x this many epochs, about 1/x of a rung's trials go on"
    )
    acc_margin: float = option(
        0.005,
        "pareto: a trial is dominated only by one at least this much more accurate (noise margin) and no more costly",
    )
    max_size_kb: float = option(
        0.0, "drop configs whose predicted artifact exceeds this many KB before they run (0 = no limit)"
    )
    max_macs: float = option(0.0, "drop configs whose MACs per image exceed this before they run (0 = no limit)")
    max_latency_ms: float = option(
        0.0,
        "drop configs whose estimated batch-1 latency (the teacher's on --deploy's runtime, scaled by MACs) exceeds "
        "this before they run (0 = no limit)",
    )
    limits: Constraints = Constraints()  # --max-drop and the tail limits, judged on val against the teacher
    prune_to_latency: bool = option(
        False,
        "with --max-latency-ms: a structured-pruning config predicted slower than the target is pruned harder, to the "
        "smallest rate above its own that meets it on the cost model, instead of being skipped",
    )
    deploy: str = option(
        "auto",
        "export every measured trial to this runtime, check it against the artifact and time it beside the teacher "
        "on the same runtime: onnx, onnx-int8, pt2, pt2-int8, openvino, openvino-int8; auto = ONNX Runtime, int8 "
        "only where the CPU has VNNI/AMX; off = no export (latency_ms is the eager PyTorch module's)",
    )
    latency_on: str = option(
        "",
        "time on nodes offering this custom Ray resource (e.g. the CPU inference node type of the cluster); "
        "comma-separated for several targets, one latency front each; '' = in the trial's own process",
    )
    latency_threads: int = option(1, "runtime threads for every latency measurement (teacher and trials alike)")
    latency_batch: int = option(256, "the throughput batch N of img_s_bN and speedup_bN")
    latency_repeats: int = option(30, "timed batch-1 calls per model (batch N: a sixth as many, at least 3)")
    share_data: bool = option(
        True,
        "decode the splits once on the driver and share them with every in-process trial through the object store; "
        "--no-share-data streams each trial's epochs through its own Ray Data pipeline",
    )
    max_concurrent: int = option(0, "trials at once (0 = what the cluster's CPUs/GPUs allow)")
    cpus_per_trial: float = option(
        1.0, "CPUs reserved per trial (with --workers-per-trial W: split evenly over its W workers)"
    )
    gpus_per_trial: float = option(
        0.0, "GPUs reserved per trial (with --workers-per-trial W: split evenly, a whole GPU per worker)"
    )
    workers_per_trial: int = option(
        1,
        "Ray Train workers per trial: 1 trains in the trial's own process, W > 1 runs a data-parallel TorchTrainer "
        "per trial",
    )
    data_cpus: float = option(
        1.0, "with --workers-per-trial > 1: logical CPUs per Ray Data decode/augment task of a trial"
    )
    augment: str = option("standard", "augmentation policy of the fine-tuning stream")
    eval_batch_size: int = option(256, "batch size for validation and calibration")
    robust_images: int = option(
        200,
        "val images every trial's final artifact is scored on under each corruption (mean corruption accuracy; 0 = "
        "off)",
    )
    robust_corruptions: str = option(
        "all", "corruptions of that score: 'all' or a comma-separated list (effray.data.corrupt)"
    )
    robust_severities: str = option(
        "1,3,5", "severities of that score (1-5); `effray evaluate --corruptions all` gives the full table"
    )
    seed: int = option(0, "seed of the search and of every trial's data stream")
    storage: str = option("runs/tune", "experiment storage path (shared or cloud storage on a multi-node cluster)")
    name: str = option("compress", "experiment name; re-running the same name resumes it")
    max_failures: int = option(1, "retries of a trial that errored")
    trust_code: bool = option(
        False, "import the pkg.module:factory the --teacher checkpoint names (never done on a file's say-so)"
    )
    wandb_project: str = option("effray", "Weights & Biases project")
    wandb: bool = option(
        True,
        "log every trial and the summary to Weights & Biases (offline when no API key is set); --no-wandb turns it off",
    )
    wandb_mode: str = option(
        "auto", "wandb mode; auto = online with an API key, else offline (wandb sync later)", choices=WANDB_MODES
    )

    def validate(self) -> None:
        require(bool(self.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent >= 0, f"--max-concurrent must be >= 0, got {self.max_concurrent}")
        require(
            self.cpus_per_trial > 0 and self.gpus_per_trial >= 0,
            "--cpus-per-trial must be > 0 and --gpus-per-trial >= 0",
        )
        require(not self.multi_objective or self.search == "optuna", "--multi-objective needs --search optuna")
        require(self.grace_period >= 1, f"--grace-period must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, f"--reduction-factor must be > 1, got {self.reduction_factor}")
        require(self.acc_margin >= 0, f"--acc-margin must be >= 0, got {self.acc_margin}")
        require(
            min(self.max_size_kb, self.max_macs, self.max_latency_ms) >= 0,
            "--max-size-kb, --max-macs and --max-latency-ms must be >= 0",
        )
        require(
            not self.prune_to_latency or self.max_latency_ms > 0,
            "--prune-to-latency prunes to --max-latency-ms: give the target (ms at batch 1)",
        )
        require(
            isinstance(self.workers_per_trial, int) and self.workers_per_trial >= 1,
            f"--workers-per-trial must be >= 1, got {self.workers_per_trial}",
        )
        require(self.data_cpus > 0, f"--data-cpus must be > 0, got {self.data_cpus}")
        require(
            self.deploy in DEPLOY_CHOICES, f"--deploy must be one of {', '.join(DEPLOY_CHOICES)}, got {self.deploy!r}"
        )
        parse_targets(self.latency_on)
        require(not self.latency_on or self.deploy != "off", "--latency-on times exported files; drop --deploy off")
        for flag, v in (
            ("--latency-threads", self.latency_threads),
            ("--latency-batch", self.latency_batch),
            ("--latency-repeats", self.latency_repeats),
        ):
            require(isinstance(v, int) and v >= 1, f"{flag} must be a positive integer, got {v}")
        require(self.robust_images >= 0, f"--robust-images must be >= 0, got {self.robust_images}")
        require(
            not self.limits.max_corruption_drop or self.robust_images > 0,
            "--max-corruption-drop needs the corruption score: drop --robust-images 0",
        )
        if self.robust_images:
            parse_corruptions(self.robust_corruptions)
            parse_severities(self.robust_severities)
        require(not self.wandb or bool(self.wandb_project), "--wandb-project is empty; name one or pass --no-wandb")

    @property
    def deploy_spec(self) -> DeploySpec | None:
        """What every measured trial is exported to and timed on; None with ``--deploy off``."""
        if self.deploy == "off":
            return None
        return DeploySpec(
            self.deploy, parse_targets(self.latency_on), self.latency_threads, self.latency_batch, self.latency_repeats
        )

    @property
    def cpus_per_worker(self) -> float:
        """What each of a trial's Ray Train workers reserves: the trial's share, split evenly."""
        return self.cpus_per_trial / self.workers_per_trial

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus_per_trial / self.workers_per_trial

    @property
    def storage_root(self) -> str:
        """``--storage`` made absolute (a URI as given, without a trailing slash): the
        experiment's place and the seed of its stable wandb ids, the same from any directory."""
        return self.storage.rstrip("/") if "://" in self.storage else os.path.abspath(self.storage)

    @property
    def experiment(self) -> str:
        """The experiment's directory (or URI): where Tune keeps its state, so re-running the
        same ``--storage``/``--name`` finds it and resumes."""
        root = self.storage_root
        return f"{root}/{self.name}" if "://" in root else os.path.join(root, self.name)
