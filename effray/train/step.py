"""The per-worker training function: all the torch code of `effray train`, top to bottom.

Ray Train runs :func:`train_loop_per_worker` on every worker: rebuild the config, build
the model, restore the newest readable checkpoint, then per epoch stream this rank's
shard, step, validate on the whole split (each rank scores its own rows; the sums are
all-reduced), report, and checkpoint from rank 0. Parallelism is the Strategy's job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from effray.config import from_dict
from effray.data.augment_torch import batch_generator, parse_policy_torch
from effray.data.pipeline import channel_stats, normalize_tensor, sample_images, torch_batches
from effray.data.shuffle import training_batches
from effray.errors import EffrayError
from effray.metrics import class_sums, sums_metrics
from effray.models import build_model
from effray.models.airbench import init_from_data, needs_data_init, whitening_biases
from effray.models.predict import tta_logits
from effray.tracking import NullTracker, TrackerSettings, make_tracker
from effray.train.checkpoint import (
    first_readable,
    read_payload,
    save_payload,
    set_rng_state,
    train_payload,
)
from effray.train.config import TrainConfig
from effray.train.parallel import make_strategy, prepare_model
from effray.train.strategy import Strategy

FAILURE_MARKER = ".effray-injected-failure"
HISTORY_FILE = "history.jsonl"
DATA_INIT_IMAGES = 5000  # training rows that set data-dependent init (airbench: 5,000)


class Schedule:
    """LR multiplier per optimizer step. A callable object (not a lambda) so LambdaLR's
    state_dict round-trips through a weights-only checkpoint."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, start: float = 0.1, end: float = 0.0) -> None:
        self.kind, self.total, self.warmup = kind, max(1, total_steps), max(0, min(warmup_steps, total_steps))
        self.start, self.end = start, end  # multipliers at step 0 and at the last step (airbench: 0.2, 0.07)

    def __call__(self, step: int) -> float:
        t = min(step, self.total)
        start, end = getattr(self, "start", 0.1), getattr(self, "end", 0.0)  # a checkpoint from before the knobs
        if t < self.warmup:
            return start + (1.0 - start) * t / self.warmup
        rest = (t - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * rest))
        return 1.0 - (1.0 - end) * rest  # one-cycle: linear up, linear down to `end`


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float | None = None,
    bias_lr_scale: float = 1.0,
    decay_biases: bool = False,
) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases just
    fights the normalisation (1-D tensors are exactly those). ``bias_lr_scale`` != 1
    moves the norm layers' parameters to a third group at ``lr * bias_lr_scale``
    (airbench: 64x on BatchNorm biases). ``decay_biases`` decays the 1-D tensors too, at
    the weights' rate per step (their group's decay divided by its lr multiplier), as
    airbench does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    bias_decay = weight_decay if decay_biases else 0.0
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": bias_decay}]
    if bias_lr_scale == 1.0:
        return groups  # two groups, as checkpoints from before the knob hold
    if lr is None:
        raise ValueError("bias_lr_scale needs the base lr")
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters() if p.requires_grad}
    groups[1]["params"] = [p for p in no_decay if id(p) not in norm_ids]
    groups.append(
        {
            "params": [p for p in no_decay if id(p) in norm_ids],
            "weight_decay": bias_decay / bias_lr_scale,
            "lr": lr * bias_lr_scale,
        }
    )
    return groups


class Lookahead:
    """airbench's lookahead (after hlb-CIFAR10): from ``start`` of the run, every ``every``
    steps the weights (and float buffers) move to an EMA of themselves, whose decay
    ``base**every * progress**power`` grows toward the end: fast steps early, strong
    averaging late. Each epoch ends with weights == EMA, so a checkpoint holds all of the
    state and a resumed run continues exactly (the EMA restarts from the loaded weights)."""

    def __init__(
        self, total_steps: int, every: int = 5, base: float = 0.95, power: float = 3.0, start: float = 0.3
    ) -> None:
        self.total, self.every, self.base, self.power = max(1, total_steps), every, base, power
        self.first = math.ceil(start * self.total)
        self.ema: dict[str, torch.Tensor] | None = None

    def _state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}

    def _start(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def begin_epoch(self, module: torch.nn.Module, step: int) -> None:
        """``step``: optimizer steps done before this epoch (a resumed run starts here)."""
        if self.ema is None and step >= self.first:
            self._start(self._state(module))

    @torch.no_grad()
    def after_step(self, module: torch.nn.Module, step: int) -> None:
        """``step``: optimizer steps done so far in the whole run (1-based)."""
        if step < self.first or step % self.every:
            return
        state = self._state(module)
        if self.ema is None:
            self._start(state)
            return
        rho = self.base**self.every * (step / self.total) ** self.power
        for k, e in self.ema.items():
            e.lerp_(state[k], 1.0 - rho)
            state[k].copy_(e)

    @torch.no_grad()
    def end_epoch(self, module: torch.nn.Module) -> None:
        if self.ema is not None:
            for k, v in self._state(module).items():
                v.copy_(self.ema[k])


def soft_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix) when the batch has them, else
    against labels; label smoothing either way."""
    if "target" in batch:
        target = batch["target"].to(logits.device).float()
        target = target * (1 - smoothing) + smoothing / logits.shape[1]
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, batch["label"].to(logits.device), label_smoothing=smoothing)


def say(line: str) -> None:
    """A line to the worker's stdout (shown on the driver). Not ``print``: Ray Train
    patches it and, when stdout is wrapped, each line comes out twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op alone). Gloo reduces CPU tensors, NCCL CUDA ones."""
    if _world():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (collective): where a run really ran,
    reported with its metrics so placement across nodes can be checked."""
    me = ray.get_runtime_context().get_node_id()
    if not _world():
        return [me]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, me)
    return [str(n) for n in nodes]


def from_rank0(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's integers on every rank (start epoch, attempt token): ranks must agree."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if _world():
        dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Re-derive every RNG from (seed, epoch, rank) so a resumed epoch draws the same
    numbers as an uninterrupted run would have."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)


def restore(rank: int) -> tuple[str, dict[str, Any]] | None:
    """The newest readable checkpoint Ray knows for this run (after a restart, or a re-run
    of the same --storage/--name), falling back to older ones when the newest is corrupt."""
    if ray.train.get_checkpoint() is None:
        return None
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    order = sorted(enumerate(reported), key=lambda ic: (ic[1].metrics.get("epoch", 0), ic[0]), reverse=True)
    by_path = {r.checkpoint.path: r.checkpoint for _, r in order} or {
        ray.train.get_checkpoint().path: ray.train.get_checkpoint()
    }
    paths = list(by_path)

    def read(path: str) -> dict[str, Any]:
        with by_path[path].as_directory() as d:  # no copy on local storage
            return read_payload(d)

    try:
        return first_readable(paths, read=read)
    except EffrayError:
        if rank == 0:
            say(f"[effray] no readable checkpoint among {len(paths)}; starting from scratch")
        return None


def validation_sums(
    strategy: Strategy,
    model: torch.nn.Module,
    shard: Any,
    meta: dict[str, Any],
    batch: int,
    rank: int,
    world: int,
    num_classes: int,
    tta: int = 0,
) -> torch.Tensor:
    """:func:`class_sums` over this replica's rows (``index % world == rank``, picked on the
    host before the copy), summed over replicas, left on the device: nothing here waits
    for the GPU."""
    model.eval()  # running BN statistics, and none of them updated by validation
    strategy.sync_for_eval(model)
    sums = torch.zeros(2 + 2 * num_classes, dtype=torch.float64, device=strategy.reduce_device)
    for b in torch_batches(shard, meta, batch, channels_last=strategy.channels_last, rows=(rank, world)):
        if len(b["label"]) == 0:  # a shape, known on the host
            continue
        sums += batch_sums(strategy, model, b["image"], b["label"], num_classes, tta).to(sums.device)
    return strategy.sum_replicas(sums)


@torch.no_grad()
def batch_sums(
    strategy: Strategy,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    tta: int = 0,
) -> torch.Tensor:
    """:func:`class_sums` of one validation batch, scored with test-time augmentation
    ``tta``, on the model's device."""
    return class_sums(tta_logits(lambda x: strategy.predict(model, x), images, tta), labels, num_classes)


def validation_metrics(sums: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The epoch's one host read of the validation sums, as the reported metrics."""
    m = sums_metrics(sums, num_classes)
    return {
        "val_accuracy": m["accuracy"],
        "val_loss": m["loss"],
        "val_count": m["count"],
        "val_per_class_accuracy": m["per_class"],
    }


def validate(
    strategy: Strategy,
    model: torch.nn.Module,
    shard: Any,
    meta: dict[str, Any],
    batch: int,
    rank: int,
    world: int,
    num_classes: int,
    tta: int = 0,
) -> dict[str, Any]:
    """Accuracy, loss and per-class accuracy on the *whole* validation split.

    Every rank reads the full split and scores the rows with ``index % world == rank``;
    summing (correct, loss, count, per-class) over ranks gives exactly the full split's
    numbers, with no row dropped or counted twice."""
    return validation_metrics(
        validation_sums(strategy, model, shard, meta, batch, rank, world, num_classes, tta), num_classes
    )


def train_step(
    strategy: Strategy,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: dict[str, Any],
    loss_fn: Any,
    sums: torch.Tensor,
    micro: int | None = None,
    frozen: tuple[torch.Tensor, ...] = (),
) -> None:
    """One optimizer step on ``batch``; its loss and row count are added to ``sums`` (on
    the device) instead of being read back, so the host never waits for the GPU here.

    ``micro``: at most this many rows per forward; a larger batch is accumulated over
    chunks (DDP syncs only the last), each chunk's loss weighted by its share, so the
    step equals one over the whole batch (an elastic run on fewer workers).

    ``frozen``: parameters this step leaves alone, momentum and weight decay included
    (their gradients are dropped before the step; DDP has already reduced them, so its
    bookkeeping is untouched, as it would not be by flipping ``requires_grad``)."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batch["label"])
    chunks = [batch] if micro is None or n <= micro else _chunks(batch, micro)
    loss = torch.zeros((), dtype=torch.float64, device=sums.device)
    for i, chunk in enumerate(chunks):

        def weighted(y: torch.Tensor, b: dict[str, Any], share: float = len(chunk["label"]) / n) -> torch.Tensor:
            return loss_fn(y, b) * share

        sync = contextlib.nullcontext() if i == len(chunks) - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss += strategy.forward_backward(model, chunk["image"], chunk, weighted).to(sums.device, torch.float64)
    for p in frozen:
        p.grad = None
    optimizer.step()
    scheduler.step()
    sums[0] += loss * n
    sums[1] += n


def _chunks(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    parts = {
        k: v.split(size) for k, v in batch.items() if torch.is_tensor(v) and v.dim() and len(v) == len(batch["label"])
    }
    return [{**batch, **{k: p[i] for k, p in parts.items()}} for i in range(len(parts["label"]))]


def _progress(epoch: int, total: int, m: dict[str, Any], eta_s: float) -> str:
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    return (
        f"[effray] epoch {epoch}/{total}  loss {m['train_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  {m['images_per_s']:,.0f} img/s  lr {m['lr']:.4g}  ETA {eta}"
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config`` = {"train": to_dict(TrainConfig),
    "run": what the driver resolved (run dir, clock, data summary, steps, tracker)}."""
    cfg = from_dict(TrainConfig, config["train"])
    run = config["run"]
    data = run["data"]
    run_dir = Path(run["run_dir"]) if run["run_dir"] else None  # None: remote storage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if device.type == "cpu":  # cheap on CPU; on GPU it would forbid fast non-deterministic kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    num_classes = int(data["num_classes"])
    model = build_model(cfg.model, num_classes, int(data["image_shape"][2]), cfg.width)
    restored = restore(rank)
    payload = restored[1] if restored else None
    if payload is not None:
        model.load_state_dict(payload["model"])
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
    model = prepare_model(model, strategy)
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.lr, cfg.bias_lr_scale, cfg.decay_biases),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    steps = int(run["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        Schedule(cfg.schedule, steps * cfg.epochs, round(cfg.warmup_epochs * steps), cfg.lr_start, cfg.lr_end),
    )
    lookahead = Lookahead(steps * cfg.epochs) if cfg.lookahead else None
    history: list[dict[str, Any]] = []
    start, elapsed = 0, 0.0
    if payload is not None:
        strategy.load_optimizer_state(model, optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"], device)
        start, history, elapsed = int(payload["epoch"]), list(payload["history"]), float(payload["elapsed_s"])
    token = random.SystemRandom().randrange(16**6)
    start, token = from_rank0([start, token], strategy.reduce_device)
    nodes = worker_nodes()
    resumed_from = start if payload is not None else None
    if rank == 0 and payload is not None:
        say(f"[effray] resuming {run['name']} from {restored[0]} (epoch {start}/{cfg.epochs})")

    gpu_policy = stats = None
    meta = {"mean": data["mean"], "std": data["std"]}
    if cfg.data.augment_on == "gpu":
        gpu_policy = parse_policy_torch(cfg.data.augment, num_classes)
        stats = channel_stats(meta["mean"], meta["std"], device)
    loss_fn = lambda logits, batch: soft_cross_entropy(logits, batch, cfg.label_smoothing)  # noqa: E731
    source = run.get("train_source")  # the cached split, reshuffled exactly every epoch; None: streamed
    train_shard = None if source is not None else ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    tracker = (
        make_tracker(TrackerSettings(**run["tracker"]))
        if rank == 0 and run["tracker"] and start < cfg.epochs
        else NullTracker()
    )
    victim = 1 if world > 1 else 0
    replica, replicas = strategy.data_rank(rank, world)
    # an elastic run's share of the global batch follows the world it has now; a fixed
    # run's is --batch-size / --workers. Either way one optimizer step sees --batch-size rows
    per_rank = cfg.batch_size // world if cfg.elastic else cfg.per_worker_batch
    micro = cfg.micro_batch if cfg.elastic else None
    epoch_times: list[float] = []
    whiten_biases = whitening_biases(strategy.unwrap(model))
    try:
        for epoch in range(start, cfg.epochs):
            seed_epoch(cfg.seed, epoch, rank)
            model.train()
            t0 = time.perf_counter()
            sums = torch.zeros(2, dtype=torch.float64, device=strategy.reduce_device)
            waited, asked = 0.0, time.perf_counter()  # time blocked on the input pipeline
            batches = strategy.batches(
                lambda epoch=epoch: training_batches(
                    source,
                    train_shard,
                    meta,
                    per_rank,
                    epoch=epoch,
                    replica=replica,
                    replicas=replicas,
                    clock=run["clock"],
                    shuffle_buffer=cfg.data.shuffle_buffer,
                    seed=cfg.seed,
                    normalise=gpu_policy is None,
                    channels_last=strategy.channels_last,
                )
            )
            if lookahead is not None:
                lookahead.begin_epoch(strategy.unwrap(model), epoch * steps)
            for step, batch in enumerate(batches):
                waited += time.perf_counter() - asked
                if gpu_policy is not None:
                    batch = augment_on_device(
                        batch, gpu_policy, stats, device, (cfg.seed, epoch, rank, step), strategy.channels_last
                    )
                train_step(
                    strategy,
                    model,
                    optimizer,
                    scheduler,
                    batch,
                    loss_fn,
                    sums,
                    micro,
                    whiten_biases if epoch >= cfg.whiten_bias_epochs > 0 else (),
                )
                if lookahead is not None:
                    lookahead.after_step(strategy.unwrap(model), epoch * steps + step + 1)
                if epoch + 1 == cfg.inject_failure_at_epoch and rank == victim and step == 0 and run_dir:
                    die_once(run_dir)
                asked = time.perf_counter()
            if lookahead is not None:
                lookahead.end_epoch(strategy.unwrap(model))
            sums = strategy.sum_replicas(torch.cat([sums, sums.new_tensor([waited])])).cpu()  # the epoch's host read
            train_s = time.perf_counter() - t0
            metrics = {
                "epoch": epoch + 1,
                "train_loss": float(sums[0] / max(sums[1], 1)),
                "images_per_s": float(sums[1]) / train_s,
                "lr": optimizer.param_groups[0]["lr"],
                "data_wait_s": float(sums[2]) / replicas,
                "nodes": nodes,
                "world": world,
                "train_rows": int(sums[1]),
                "optimizer_steps": scheduler.last_epoch,
            }
            last = epoch + 1 == cfg.epochs
            # TTA costs up to 6 forward passes: only the final (reported, checkpointed) score uses it
            metrics.update(
                validate(
                    strategy,
                    model,
                    val_shard,
                    meta,
                    max(256, cfg.per_worker_batch),
                    replica,
                    replicas,
                    num_classes,
                    tta=cfg.tta if last else 0,
                )
            )
            epoch_times.append(time.perf_counter() - t0)
            elapsed += epoch_times[-1]
            metrics.update(epoch_s=epoch_times[-1], elapsed_s=elapsed)
            history.append({k: v for k, v in metrics.items() if k != "val_per_class_accuracy"})
            if rank == 0:
                eta = (cfg.epochs - epoch - 1) * sum(epoch_times) / len(epoch_times)
                say(_progress(epoch + 1, cfg.epochs, metrics, eta))
                tracker.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=epoch + 1)
                if run_dir is not None:
                    _append_history(run_dir, {**history[-1], "attempt": f"{token:06x}", "resumed_from": resumed_from})
            if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory(prefix="effray-ckpt-") as tmp:
                    ckpt = None
                    # every rank: a pipeline gathers its stages' parts to rank 0 here
                    model_state, opt_state = strategy.state_dict(model), strategy.optimizer_state(model, optimizer)
                    if rank == 0:
                        f = save_payload(
                            tmp,
                            train_payload(
                                model_state=model_state,
                                model_spec=dict(strategy.unwrap(model).spec),
                                optimizer=opt_state,
                                scheduler=scheduler.state_dict(),
                                epoch=epoch + 1,
                                config=config["train"],
                                data=data,
                                history=history,
                                provenance=run["provenance"],
                                elapsed_s=elapsed,
                                numerics=strategy.numerics(),
                                device=device,
                            ),
                        )
                        if last:
                            tracker.log_checkpoint(str(f), f"{run['name']}-model", {"epoch": epoch + 1, **metrics})
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch + 1:04d}-{token:06x}")
            else:
                ray.train.report(metrics)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def augment_on_device(
    batch: dict[str, Any],
    policy: Any,
    stats: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    key: tuple[int, int, int, int],
    channels_last: bool = False,
) -> dict[str, Any]:
    """``--augment-on gpu``: uint8 NHWC batch -> augmented, normalised NCHW on the device,
    with a generator seeded from (seed, epoch, rank, step) so runs repeat exactly.
    ``stats``: :func:`effray.data.pipeline.channel_stats` on ``device``, made once."""

    seed, epoch, rank, step = key
    g = batch_generator(seed, epoch, (rank << 32) + step, device)
    out = policy({k: v.to(device, non_blocking=True) for k, v in batch.items()}, g, seed=seed, epoch=epoch)
    out["image"] = normalize_tensor(out["image"], *stats, channels_last)
    return out


def die_once(run_dir: Path) -> None:
    """The fault-injection knob: exit hard (as an OOM kill would) the first time only; the
    marker in the run dir stops the restarted worker from dying again."""
    marker = run_dir / FAILURE_MARKER
    if marker.exists():
        return
    # die only once the previous epoch's checkpoint is durable: otherwise whether the
    # restart resumes from it or the one before depends on when Ray Train processed the
    # last report, and a test of "resumes from epoch N-1" would be a race
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"pid {os.getpid()} died on purpose at {time.time():.0f}\n")
    say("[effray] injected failure: this worker exits now")
    os._exit(1)


def _append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """Every epoch actually run, one JSON line each, across restarts (the checkpoint's
    history only holds the lineage that survived): how "no epoch ran twice" is checked."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:  # remote storage path: nothing local to append to
        say(f"[effray] history not written ({exc})")
