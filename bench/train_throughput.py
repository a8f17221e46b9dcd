"""Training images/s: effray's Ray Train DDP (2 workers x 1 thread) vs a plain PyTorch loop (2 threads).

Same model, global batch, optimizer and rows (a prepared slice of the shared CIFAR-10
file, no augmentation, so both sides do the same arithmetic):

(a) plain: one process, ``torch.set_num_threads(2)``, the decoded rows already in memory
    as normalised tensors, a shuffled pass per epoch, the same numerics effray picks for
    this CPU (channels-last, bf16 autocast where the CPU has native bf16): the ceiling;
(b) effray: ``effray.train.train`` with 2 workers of 1 CPU each, the rows streamed
    through Ray Data into each worker, gradients all-reduced over gloo, metrics reported
    to Ray Train every epoch (checkpoints only at the end).

Images/s are training-only (validation excluded) and the first epoch (warm-up) is
dropped on both sides. Last line: ``ratio_vs_plain_torch=<x>`` (target >= 0.95).

    python bench/train_throughput.py [--rows 10000] [--model fastnet --width 0.5] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from effray.cluster import init_ray
from effray.data.arrays import prepared_batches
from effray.data.images import normalize_tensor
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.models import build_model
from effray.models.predict import logits
from effray.train.config import TrainConfig
from effray.train.loop import HISTORY_FILE
from effray.train.parallel import make_strategy
from effray.train.run import train
from effray.train.step import param_groups

ROOT = Path(__file__).resolve().parents[1]


def plain_torch(data_dir: str, args: argparse.Namespace) -> list[float]:
    """Images/s per epoch of the plain single-process loop."""
    torch.set_num_threads(2)
    meta = load_meta(data_dir)
    _, batches = prepared_batches(data_dir, "train", 4096)
    xs, ys = zip(*batches)
    x = normalize_tensor(torch.from_numpy(np.concatenate(xs)), meta["mean"], meta["std"])
    y = torch.from_numpy(np.concatenate(ys))
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    numerics = make_strategy("ddp", cpu, channels_last=True, compile=False, amp=True)
    print(f"  numerics (both sides): {numerics.numerics()}", flush=True)
    model = build_model(args.model, meta["num_classes"], width=args.width)
    if numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9, nesterov=True)
    rates = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        model.train()
        t0 = time.perf_counter()
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits(model, x[idx], cpu, numerics.numerics()), y[idx], label_smoothing=0.1).backward()
            opt.step()
        rates.append(len(y) / (time.perf_counter() - t0))
        print(f"  plain torch  epoch {epoch + 1}: {rates[-1]:8.1f} img/s", flush=True)
    return rates


def ray_ddp(data_dir: str, storage: str, args: argparse.Namespace) -> list[float]:
    """Images/s per epoch of effray's Ray Train DDP run (from its per-epoch history)."""
    cfg = TrainConfig(
        data=DataConfig(data=data_dir, augment="none", shuffle_buffer=0),
        model=args.model,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=0.05,
        workers=2,
        cpus_per_worker=1.0,
        data_cpus=1.0,
        checkpoint_every=args.epochs,
        storage=storage,
        name="throughput",
        wandb=False,
        max_failures=0,
    )
    result = train(cfg)
    rows = [json.loads(ln) for ln in Path(result["run_dir"], HISTORY_FILE).read_text().splitlines()]
    for r in rows:
        print(
            f"  effray DDP   epoch {r['epoch']}: {r['images_per_s']:8.1f} img/s  "
            f"(waiting for data {r['data_wait_s']:.1f} s of {r['epoch_s']:.1f} s)",
            flush=True,
        )
    return [r["images_per_s"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parquet", default=str(ROOT.parent / "shared" / "data" / "cifar10-train.parquet"))
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--model", default="fastnet")
    p.add_argument("--width", type=float, default=0.5)
    # effray train's default global batch; at 256 the fixed per-step costs (a Ray Data batch
    # fetch, DDP's sync) weigh twice as much against a 2x-faster bf16 step
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    args.epochs = max(2, args.epochs)  # the first epoch is warm-up on both sides
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # 2 workers x 1 CPU + 1 for the Ray Data task: logical CPUs, the machine has 2 cores
    init_ray(num_cpus=3, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="effray-bench-") as tmp:
        data_dir = os.path.join(tmp, "data")
        prepare(PrepareConfig(source=args.parquet, out=data_dir, limit=args.rows, val_fraction=0.02, test_fraction=0.0))
        n = load_meta(data_dir)["counts"]["train"]
        print(
            f"{args.model} width {args.width}, global batch {args.batch_size}, {n} training rows, {args.epochs} epochs "
            "(first dropped)",
            flush=True,
        )
        plain = statistics.median(plain_torch(data_dir, args)[1:])
        ddp = statistics.median(ray_ddp(data_dir, os.path.join(tmp, "runs"), args)[1:])
    ray.shutdown()
    print(f"{'':24}{'images/s':>10}")
    print(f"{'plain torch (2 threads)':24}{plain:10.1f}")
    print(f"{'effray Ray DDP (2x1)':24}{ddp:10.1f}")
    print(f"ratio_vs_plain_torch={ddp / plain:.3f}")


if __name__ == "__main__":
    main()
