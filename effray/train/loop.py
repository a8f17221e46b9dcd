"""The per-worker training function of `effray train`: its setup, and its hooks on the one loop.

:func:`train_loop_per_worker` rebuilds what the driver handed over (:class:`TrainWorker`),
builds the model (airbench's whitening stem set from the same rows on every rank) or
restores the newest readable checkpoint, prepares it with the ``--parallel`` strategy and
runs :func:`effray.train.recipe.run_recipe` with :class:`TrainHooks`: SGD over weight-decay groups
on a one-cycle or cosine schedule, label-smoothed (soft-target) cross-entropy, optional
on-device augmentation, exact validation (TTA on the last epoch) and, from rank 0 only, the
progress line, wandb, the epoch log and the checkpoints.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effray.config import from_dict, to_dict
from effray.console import relay_to, say
from effray.data.augment import augment_on_device, device_augmentation
from effray.data.images import sample_images
from effray.data.shuffle import CachedSplit
from effray.models import build_model
from effray.models.airbench import init_from_data, needs_data_init
from effray.models.reference import use_factories
from effray.models.weights import initial_weights
from effray.tracking import NullTracker, Tracker, TrackerSettings, make_tracker
from effray.train.checkpoint import set_rng_state, train_payload
from effray.train.config import TrainConfig
from effray.train.faults import InjectedFailure
from effray.train.parallel import make_strategy, prepare_model
from effray.train.recipe import Hooks, Plan, Run, run_recipe
from effray.train.session import EpochEnd, RaySession, from_rank0
from effray.train.step import Lookahead, Schedule, param_groups, soft_cross_entropy
from effray.train.validate import validate

__all__ = [
    "HISTORY_FILE",
    "TrainWorker",
    "train_loop_per_worker",
]

HISTORY_FILE = "history.jsonl"
DATA_INIT_IMAGES = 5000  # training rows that set data-dependent init (airbench: 5,000)


@dataclass(frozen=True)
class TrainWorker:
    """What every worker of an `effray train` run gets from the driver (as ``to_dict``, rebuilt
    with ``from_dict``): the config, and what the driver resolved for it."""

    train: TrainConfig
    name: str
    run_dir: str = ""  # the run's local directory; "" on remote storage (no local extras)
    clock: str = ""  # the epoch clock actor the streamed pipeline's augmentation keys on
    data: dict[str, Any] = field(default_factory=dict)  # effray.train.checkpoint.data_summary
    provenance: dict[str, Any] = field(default_factory=dict)
    steps_per_epoch: int = 1
    tracker: TrackerSettings | None = None  # None: no wandb
    train_source: CachedSplit | None = None  # the cached split reshuffled exactly every epoch; None: streamed
    factories: dict[str, Any] = field(default_factory=dict)  # the Python API's model factories, by reference
    progress: str = ""  # the driver's step-bar relay actor (effray.console.relayed_step_bars); "": no bar


class TrainHooks(Hooks):
    """`effray train`'s recipe on the loop: no structural events; the loss, the schedule,
    validation, and rank 0's reports and checkpoints."""

    def __init__(
        self, worker: TrainWorker, session: RaySession, run: Run, tracker: Tracker, token: int, resumed: bool
    ) -> None:
        cfg = self.cfg = worker.train
        self.worker, self.tracker, self.token = worker, tracker, token
        self.resumed_from = run.start if resumed else None
        self.num_classes = int(worker.data["num_classes"])
        # the model's preprocessing: validation rows stored at another size than it takes
        self.meta = {k: worker.data.get(k) for k in ("mean", "std", "preprocess")}
        self.replica, self.replicas = run.strategy.data_rank(session.rank, session.world)
        self.augment = None
        if cfg.data.augment_on == "gpu":
            self.augment = device_augmentation(
                cfg.data.augment, self.num_classes, self.meta["mean"], self.meta["std"], session.device
            )
        # an elastic run's share of the global batch follows the world it has now; a fixed
        # run's is --batch-size / --workers. Either way one optimizer step sees --batch-size rows
        per_rank = cfg.batch_size // session.world if cfg.elastic else cfg.per_worker_batch
        self.epochs = session.epochs(
            worker.train_source,
            self.meta,
            per_rank,
            replica=self.replica,
            replicas=self.replicas,
            clock=worker.clock,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.seed,
            normalise=self.augment is None,
            channels_last=run.strategy.channels_last,
        )
        self.val = session.dataset("val")

    def optimizer(self, run: Run, state: dict[str, Any] | None = None) -> tuple[Any, Any]:
        cfg, steps = self.cfg, self.worker.steps_per_epoch
        optimizer = torch.optim.SGD(
            param_groups(run.model, cfg.weight_decay, cfg.lr, cfg.bias_lr_scale, cfg.decay_biases),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            Schedule(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps), cfg.lr_start, cfg.lr_end),
        )
        if state is not None:
            run.strategy.load_optimizer_state(run.model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        return optimizer, scheduler

    def batches(self, run: Run, epoch: int) -> Any:
        return self.epochs(epoch)

    def on_device(self, run: Run, batch: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        if self.augment is None:
            return batch
        policy, stats = self.augment
        key = (self.cfg.seed, epoch, run.session.rank, step)
        return augment_on_device(batch, policy, stats, run.device, key, run.strategy.channels_last)

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return soft_cross_entropy(logits, batch, self.cfg.label_smoothing)

    def validate(self, run: Run, epoch: int) -> dict[str, Any]:
        # TTA costs up to 6 forward passes: only the final (reported, checkpointed) score uses it
        last = epoch + 1 == self.cfg.epochs
        batch = max(256, self.cfg.per_worker_batch)
        return validate(
            run.strategy,
            run.model,
            self.val,
            self.meta,
            batch,
            self.replica,
            self.replicas,
            self.num_classes,
            tta=self.cfg.tta if last else 0,
        )

    def after_epoch(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        cfg, worker, session = self.cfg, self.worker, run.session
        run.history.append({k: v for k, v in metrics.items() if k != "val_per_class_accuracy"})
        last = epoch + 1 == cfg.epochs
        if session.rank == 0:
            eta = (cfg.epochs - epoch - 1) * sum(run.epoch_times) / len(run.epoch_times)
            say(progress_line(epoch + 1, cfg.epochs, metrics, eta))
            self.tracker.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=epoch + 1)
            if worker.run_dir:
                record = {**run.history[-1], "attempt": f"{self.token:06x}", "resumed_from": self.resumed_from}
                append_history(Path(worker.run_dir), record)
        if (epoch + 1) % cfg.checkpoint_every and not last:
            session.report(EpochEnd(epoch, metrics, run.plain))
            return
        # every rank: a pipeline gathers its stages' parts to rank 0 here
        model_state = run.strategy.state_dict(run.model)
        opt_state = run.strategy.optimizer_state(run.model, run.optimizer)

        def payload() -> dict[str, Any]:
            return train_payload(
                model_state=model_state,
                model_spec=dict(run.plain.spec),
                optimizer=opt_state,
                scheduler=run.scheduler.state_dict(),
                epoch=epoch + 1,
                config=to_dict(cfg),
                data=worker.data,
                history=run.history,
                provenance=worker.provenance,
                elapsed_s=run.elapsed,
                numerics=run.strategy.numerics(),
                device=run.device,
            )

        def saved(path: Path) -> None:
            if last:
                self.tracker.log_checkpoint(str(path), f"{worker.name}-model", {"epoch": epoch + 1, **metrics})

        name = f"epoch-{epoch + 1:04d}-{self.token:06x}"
        session.report(EpochEnd(epoch, metrics, run.plain, payload), name=name, saved=saved)

    def at_end(self, run: Run) -> None:
        self.tracker.finish()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config`` = {"worker": to_dict(TrainWorker)}."""
    worker = from_dict(TrainWorker, config["worker"])
    cfg, data = worker.train, worker.data
    session = RaySession()
    device = session.device
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if device.type == "cpu":  # cheap on CPU; on GPU it would forbid fast non-deterministic kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    use_factories(worker.factories)
    model = build_model(cfg.model, int(data["num_classes"]), int(data["image_shape"][2]), cfg.width)
    restored = session.restore()
    payload = restored[1] if restored else None
    if payload is not None:
        model.load_state_dict(payload["model"])
    elif cfg.weights or cfg.pretrained:  # checked on the driver; every rank loads the same file
        initial_weights(model, cfg.weights, cfg.model if cfg.pretrained else "")
    elif needs_data_init(model):  # e.g. airbench's whitening stem: the same rows on every rank
        init_from_data(model, sample_images(cfg.data.data, DATA_INIT_IMAGES, data["mean"], data["std"]))
    strategy = make_strategy(
        cfg.parallel,
        device,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        amp=cfg.amp,
        **cfg.strategy_options(),
    )
    run = Run(session, strategy, prepare_model(model, strategy))
    start = 0
    if payload is not None:
        start, run.history, run.elapsed = int(payload["epoch"]), list(payload["history"]), float(payload["elapsed_s"])
    token = random.SystemRandom().randrange(16**6)
    run.start, token = from_rank0([start, token], strategy.reduce_device)
    tracking = session.rank == 0 and worker.tracker is not None and run.start < cfg.epochs
    tracker = make_tracker(worker.tracker) if tracking else NullTracker()
    hooks = TrainHooks(worker, session, run, tracker, token, resumed=payload is not None)
    run.optimizer, run.scheduler = hooks.optimizer(run, payload)
    run.lookahead = Lookahead(worker.steps_per_epoch * cfg.epochs) if cfg.lookahead else None
    if payload is not None:
        set_rng_state(payload["rng"], device)
        if session.rank == 0:
            say(f"[effray] resuming {worker.name} from {restored[0]} (epoch {run.start}/{cfg.epochs})")
    plan = Plan(
        epochs=cfg.epochs,
        steps_per_epoch=worker.steps_per_epoch,
        seed=cfg.seed,
        micro_batch=cfg.micro_batch if cfg.elastic else None,
        whiten_bias_epochs=cfg.whiten_bias_epochs,
        failure=InjectedFailure(cfg.inject_failure_at_epoch, worker.run_dir),
        progress=relay_to(worker.progress) if worker.progress and session.rank == 0 else None,
    )
    try:
        run_recipe(run, plan, hooks)
    except BaseException:
        tracker.finish(exit_code=1)
        raise


def progress_line(epoch: int, total: int, m: dict[str, Any], eta_s: float) -> str:
    """Rank 0's line per epoch."""
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    return (
        f"[effray] epoch {epoch}/{total}  loss {m['train_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  {m['images_per_s']:,.0f} img/s  lr {m['lr']:.4g}  ETA {eta}"
    )


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """Every epoch actually run, one JSON line each, across restarts (the checkpoint's
    history only holds the lineage that survived): how "no epoch ran twice" is checked."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:  # remote storage path: nothing local to append to
        say(f"[effray] history not written ({exc})")
