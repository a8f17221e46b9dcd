"""``TrainConfig``: every knob of `effray train`, one frozen dataclass.

The same definition gives the CLI flags (the nested :class:`DataConfig` flattens into
``--data``, ``--augment``, ``--seed``...), the dict the workers rebuild it from, the
wandb config and the checkpoint's provenance.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from effray.config import AUTO, option, require, require_whole_gpus, to_dict
from effray.data.augment import AUTO_PREPROCESS, parse_policy
from effray.data.pipeline import DataConfig
from effray.models import build_model, check_model_name
from effray.models.reference import is_reference
from effray.train.stages import PIPELINE_SCHEDULES, stage_bounds

# The loop only talks to a Strategy (effray.train.strategy, effray.train.pipeline).
PARALLEL = ("ddp", "pipeline")
# pipeline-only knobs: left out of a DDP run's default name, so existing names don't change
_PIPELINE_FIELDS = {"stages", "microbatches", "pipeline_schedule", "split_points", "split_by"}
SPLIT_BY = ("params", "time")
SCHEDULES = ("onecycle", "cosine")
TTA_LEVELS = (0, 1, 2)
# knobs added after runs existed: left out of the default name at their defaults, so
# the names (and resumes) of runs that don't use them stay what they were
_LATER_DEFAULTS = {
    "weights": "",
    "pretrained": False,
    "bias_lr_scale": 1.0,
    "lookahead": False,
    "tta": 0,
    "max_workers": 0,
    "worker_resources": "",
    "whiten_bias_epochs": 0,
    "decay_biases": False,
    "lr_start": 0.1,
    "lr_end": 0.0,
    "preprocess": "auto",
}
WANDB_MODES = ("auto", "online", "offline", "disabled")
# Fields that don't change what a run computes: left out of the default run name, so
# re-running a command with another --max-failures or wandb project still resumes it.
_NOT_IN_NAME = {
    "storage",
    "name",
    "wandb_project",
    "wandb",
    "wandb_mode",
    "max_failures",
    "grow_check_s",
    "resize_timeout_s",
    "inject_failure_at_epoch",
    "keep_checkpoints",
    "checkpoint_every",
    "data_cpus",
}
_DATA_NOT_IN_NAME = {"cache_decoded", "stream_buffer_mb"}  # how rows reach training, not which rows


@dataclass(frozen=True)
class TrainConfig:
    """What to train, how, on how many workers, and where results go."""

    data: DataConfig = DataConfig()
    model: str = option(
        "fastnet",
        "a built-in model (effray.models.model_names()) or a reference: torchvision:NAME, timm:NAME or "
        "pkg.module:factory, each with ?k=v,... arguments (e.g. timm:vit_tiny_patch16_224?img_size=64)",
    )
    width: float = option(1.0, "channel width multiplier (built-in models)")
    weights: str = option(
        "",
        "start from this state dict (.pt/.pth weights-only, or .safetensors; a classifier of another size is "
        "re-initialised); a path every node sees",
    )
    pretrained: bool = option(
        False, "start from torchvision's or timm's published weights for --model (downloaded, or from the cache)"
    )
    epochs: int = option(10, "training epochs")
    batch_size: int = option(512, "global batch size: images per optimizer step across all workers")
    lr: float = option(0.2, "peak learning rate (for the global batch)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay (on norm weights and biases only with --decay-biases)")
    decay_biases: bool = option(
        False, "decay biases and norm shifts too, at the weights' rate per step whatever their lr (airbench)"
    )
    label_smoothing: float = option(0.1, "label smoothing for the cross-entropy")
    bias_lr_scale: float = option(
        1.0,
        "learning-rate multiplier for the norm layers' parameters, which never decay (airbench: 64 on BatchNorm "
        "biases)",
    )
    lookahead: bool = option(
        False,
        "airbench's lookahead: after the first 0.3 of the steps, every 5 steps pull the weights to their EMA (decay "
        "0.95^5 x progress^3)",
    )
    whiten_bias_epochs: int = option(
        0,
        "airbench: train the whitening stem's bias for the first N epochs only, then freeze it (airbench: 3); 0 = "
        "train it throughout",
    )
    tta: int = option(
        0,
        "test-time augmentation of the final validation (the score reported and checkpointed): 0 none, 1 mirror, 2 "
        "mirror + two 1-pixel translations",
        choices=TTA_LEVELS,
    )
    preprocess: str = option(
        "auto",
        "what validation, evaluation and deployment do to a stored (or served) image instead of --augment: ops that "
        "draw nothing, ending at the size --augment makes (auto = resize(S)|center_crop(S), S that size)",
    )
    schedule: str = option(
        "onecycle",
        "per-step LR schedule: onecycle (linear up, linear down) or cosine (linear warm-up, cosine down)",
        choices=SCHEDULES,
    )
    warmup_epochs: float = option(1.0, "epochs of linear warm-up to the peak LR")
    lr_start: float = option(0.1, "LR at the first step, as a fraction of --lr (airbench: 0.2)")
    lr_end: float = option(0.0, "LR at the last step, as a fraction of --lr (airbench: 0.07)")
    workers: int = option(2, "data-parallel workers (Ray Train workers); `--workers MIN-MAX` trains elastic")
    worker_resources: str = option(
        "",
        "extra Ray resources each worker needs, e.g. 'trainer=1': keeps workers on the nodes "
        "that offer them (and the other nodes' CPUs free for Ray Data's tasks)",
    )
    max_workers: int = option(
        0,
        "elastic DDP: grow to this many workers while the nodes are there and keep going on as few "
        "as --workers when nodes die, same global batch and schedule (0 = exactly --workers)",
    )
    grow_check_s: float = option(
        30.0,
        "elastic: seconds between looks for room to grow (a growth restarts the workers "
        "from the latest checkpoint, so not too often)",
    )
    resize_timeout_s: float = option(
        5.0,
        "elastic: seconds a new worker group may wait for its resources before the run "
        "tries the size that fits again (a node that just died still looks free to Ray "
        "for up to ~20 s; Ray Train's own wait is 60 s)",
    )
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 trains on GPUs with NCCL, 0 on CPUs with gloo")
    cpus_per_worker: float = option(
        AUTO,
        "logical CPUs reserved per worker (torch threads = max(1, floor(this))); auto = what the "
        "cluster holds: its CPUs less --data-cpus, split over --workers (on GPUs: each "
        "GPU node's CPUs per GPU)",
        auto=True,
    )
    data_cpus: float = option(
        1.0, "logical CPUs per Ray Data decode/augment task; workers x cpus-per-worker + this must fit the cluster"
    )
    channels_last: bool = option(True, "channels-last memory format (faster convs on GPUs and x86 CPUs)")
    compile: bool = option(False, "torch.compile the model")
    amp: bool = option(
        True,
        "bf16 autocast where the hardware has native bf16 (Ampere+ GPUs, CPUs with AVX512-BF16/AMX); fp32 elsewhere",
    )
    checkpoint_every: int = option(1, "checkpoint every N epochs (and always after the last)")
    keep_checkpoints: int = option(2, "checkpoints to keep (the newest; >= 2 lets a corrupt newest fall back)")
    max_failures: int = option(2, "worker-group restarts from the latest checkpoint before giving up (-1 = forever)")
    storage: str = option("runs", "where runs live (a shared path on multi-node clusters)")
    name: str = option("", "run name; the same --storage/--name resumes that run (default: derived from the config)")
    wandb_project: str = option("effray", "Weights & Biases project")
    wandb: bool = option(True, "log to Weights & Biases (offline when no API key is set); --no-wandb turns it off")
    wandb_mode: str = option(
        "auto", "wandb mode; auto = online with an API key, else offline (wandb sync later)", choices=WANDB_MODES
    )
    parallel: str = option(
        "ddp", "parallelism strategy: ddp, or pipeline (--stages x data-parallel replicas)", choices=PARALLEL
    )
    stages: int = option(
        2, "pipeline stages (--parallel pipeline); --workers must be a multiple, the rest is data-parallel"
    )
    microbatches: int = option(4, "micro-batches per step per pipeline (--parallel pipeline; >= --stages)")
    pipeline_schedule: str = option(
        "gpipe", "pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b", choices=PIPELINE_SCHEDULES
    )
    split_points: str = option("", "block indices where stages 2.. start, e.g. 3,7 (default: balanced by --split-by)")
    split_by: str = option(
        "params",
        "automatic stage balance: by parameter count, or by forward+backward time measured per block on rank 0's "
        "device",
        choices=SPLIT_BY,
    )
    inject_failure_at_epoch: int = option(
        -1, "for testing fault tolerance: worker rank 1 (0 if alone) dies once during this epoch (1-based; -1 = never)"
    )

    @property
    def seed(self) -> int:
        """One seed for init, shuffling and augmentation (the ``--seed`` flag lives on ``data``)."""
        return self.data.seed

    def validate(self) -> None:

        check_model_name(self.model)
        require(self.width > 0, f"--width must be > 0, got {self.width}")
        require(
            self.width == 1.0 or not is_reference(self.model),
            f"--width applies to effray's built-in models; give {self.model} its size through its ?k=v arguments",
        )
        require(not (self.weights and self.pretrained), "--weights and --pretrained both set the start; pass one")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--workers", self.workers)):
            require(value > 0, f"{flag} must be a positive integer, got {value}")
        if self.parallel == "pipeline":
            self._validate_pipeline()
        parse_resources(self.worker_resources)
        require(
            self.grow_check_s > 0 and self.resize_timeout_s > 0,
            f"--grow-check-s and --resize-timeout-s must be > 0, got {self.grow_check_s} and {self.resize_timeout_s}",
        )
        require(
            self.max_workers == 0 or self.max_workers >= self.workers,
            f"--max-workers {self.max_workers} must be >= --workers {self.workers} (or 0: a fixed world size)",
        )
        if self.elastic:
            require(
                self.parallel == "ddp",
                "elastic training (--workers MIN-MAX) is for --parallel ddp; a pipeline's mesh is fixed",
            )
            odd = [w for w in self.world_sizes if self.batch_size % w]
            step = math.lcm(*self.world_sizes)
            require(
                not odd,
                f"--batch-size {self.batch_size} can't be split evenly over {odd[0] if odd else 0} workers; with "
                f"--workers {self.workers}-{self.max_workers} use a multiple of {step} so every world size "
                "keeps the same global batch",
            )
        require(
            self.batch_size % self.data_parallel == 0,
            f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers} (each worker takes an "
            "equal share)"
            if self.parallel != "pipeline"
            else f"--batch-size {self.batch_size} must be a multiple of the {self.data_parallel} pipeline replicas "
            "(--workers / --stages)",
        )
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        require(self.bias_lr_scale > 0, f"--bias-lr-scale must be > 0, got {self.bias_lr_scale}")
        require(
            0 <= self.lr_start <= 1 and 0 <= self.lr_end <= 1,
            f"--lr-start and --lr-end are fractions of --lr in [0, 1], got {self.lr_start} and {self.lr_end}",
        )
        require(
            self.whiten_bias_epochs >= 0,
            f"--whiten-bias-epochs must be >= 0 (0 = never freeze), got {self.whiten_bias_epochs}",
        )
        if self.preprocess != AUTO_PREPROCESS:
            require(
                not parse_policy(self.preprocess, 1).random,
                f"--preprocess {self.preprocess!r} draws random numbers; use ops like resize(S) and center_crop(S)",
            )
        require(self.tta in TTA_LEVELS, f"--tta must be one of {', '.join(map(str, TTA_LEVELS))}, got {self.tta}")
        require(
            0 <= self.warmup_epochs <= self.epochs,
            f"--warmup-epochs must be in [0, --epochs], got {self.warmup_epochs}",
        )
        require(self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        require_whole_gpus(self.workers, self.gpus_per_worker)
        require(self.cpus_per_worker >= 0, f"--cpus-per-worker must be > 0 or auto, got {self.cpus_per_worker}")
        require(self.data_cpus > 0, f"--data-cpus must be > 0, got {self.data_cpus}")
        require(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        require(self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}")
        require(bool(self.storage), "--storage must name a directory")
        require(
            not self.name or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) is not None,
            f"--name {self.name!r} may use letters, digits, '_', '.', '-' only",
        )
        require(not self.wandb or bool(self.wandb_project), "--wandb-project is empty; name one or pass --no-wandb")
        require(
            self.inject_failure_at_epoch == -1 or 1 <= self.inject_failure_at_epoch <= self.epochs,
            f"--inject-failure-at-epoch must be -1 or in 1..{self.epochs}",
        )

    def _validate_pipeline(self) -> None:

        s, m = self.stages, self.microbatches
        require(
            not is_reference(self.model),
            f"--parallel pipeline cuts an nn.Sequential of blocks into stages; {self.model} is a graph of its own: "
            "train it with --parallel ddp",
        )
        require(s >= 2, f"--stages must be >= 2 with --parallel pipeline, got {s}")
        require(m >= s, f"--microbatches {m} must be >= --stages {s} (fewer leaves stages idle)")
        require(
            self.workers % s == 0,
            f"--workers {self.workers} must be a multiple of --stages {s} (workers = stages x data-parallel replicas)",
        )
        blocks = len(build_model(self.model, 10, 3, self.width))
        require(s <= blocks, f"--stages {s} is more than model {self.model}'s {blocks} blocks")
        require(self.data.augment_on != "gpu", "--augment-on gpu is not supported with --parallel pipeline")
        if self.split_points:
            stage_bounds(build_model(self.model, 10, 3, self.width), s, self.split_points)
        require(
            self.batch_size // max(1, self.workers // s) >= m,
            f"--batch-size {self.batch_size} gives each pipeline fewer images than --microbatches {m}",
        )

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.workers

    @property
    def world_sizes(self) -> range:
        """Every world size the run may train at."""
        return range(self.workers, max(self.workers, self.max_workers) + 1)

    @property
    def micro_batch(self) -> int:
        """Images per forward per worker: the full-size world's share. A smaller world
        takes more of them per optimizer step (gradient accumulation), so memory per worker
        stays what it was and the global batch stays ``batch_size``."""
        return self.batch_size // max(self.world_sizes)

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: every worker under DDP, workers / stages for a pipeline."""
        return self.workers // self.stages if self.parallel == "pipeline" else self.workers

    @property
    def per_worker_batch(self) -> int:
        """Images per step per data-parallel replica (a pipeline's stage 0 reads them)."""
        return self.batch_size // self.data_parallel

    def strategy_options(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "microbatches": self.microbatches,
            "pipeline_schedule": self.pipeline_schedule,
            "split_points": self.split_points,
            "split_by": self.split_by,
            "microbatch_size": max(1, self.per_worker_batch // self.microbatches),
        }

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


def parse_resources(text: str) -> dict[str, float]:
    """``"trainer=1,ssd=0.5"`` -> ``{"trainer": 1.0, "ssd": 0.5}`` (custom Ray resources)."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        require(
            bool(name) and amount > 0 and name not in ("CPU", "GPU"),
            f"--worker-resources takes name=amount pairs of custom resources like 'trainer=1', got {item!r} "
            "(CPUs and GPUs have their own flags)",
        )
        out[name] = amount
    return out


def default_run_name(cfg: TrainConfig) -> str:
    """``<model>-<hash of what the run computes>``: the same command gets the same name,
    so re-running it resumes instead of starting over (Ray restores by name)."""
    d = to_dict(cfg)
    d["data"] = {k: v for k, v in d["data"].items() if k not in _DATA_NOT_IN_NAME}
    d = {
        k: v
        for k, v in d.items()
        if k not in _NOT_IN_NAME
        and (cfg.parallel == "pipeline" or k not in _PIPELINE_FIELDS)
        and not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])
    }
    digest = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]
    # a reference's ':' and '?' make no directory name; a built-in name comes through as it was
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', cfg.model.split('?')[0]).strip('-')}-{digest}"


# The fields that fix the architecture: a run resumed with others can't load its checkpoint.
def model_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict a checkpoint's weights depend on."""
    return {"model": cfg.get("model"), "width": float(cfg.get("width", 0.0))}
