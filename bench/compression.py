"""Compression benchmark: from a trained baseline, what each recipe buys, measured on the artifact.

Trains a small baseline in-process on the shared CIFAR-10 file when no ``--teacher`` is
given (``--minutes`` of CPU), then runs three recipes through ``effray.compress.recipe``:

* ``int8``:       the teacher itself, converted to the int8 CPU runtime (torchao PT2E, oneDNN x86 kernels);
* ``struct50``:   structured channel pruning sized to remove ~50% of MACs, KD fine-tune;
* ``deep``:       Deep-Compression style: cubic unstructured pruning to ``--sparsity``,
  ``--bits``-bit QAT of every layer (first/last at 8), KD, LZMA over the packed weights;
* ``struct50+features`` and ``deep+features``: the same with feature distillation of the
  ``--kd-features`` modules on top of the logit KD (the same seed, images and epochs, so
  the pair differs by the feature term alone).

Prints one table (accuracy drop, size ratio, dense and sparse MAC ratios, int8-vs-fp32
latency at batch 256) and writes every metrics dict to ``--out/results.json``. Latency is
measured at ``--threads`` threads (default 1: the benchmark machine is shared and two
threads there make OpenMP barriers, not kernels, the cost).

    python bench/compression.py [--teacher RUN_DIR --data ITS_DATASET] [--minutes 4] [--finetune-epochs 2]

A baseline trained here is saved as ``--out/teacher`` (an uncompressed artifact); pass it
back as ``--teacher`` to try other recipes without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from effray.compress.artifact import save_artifact
from effray.compress.config import CompressConfig
from effray.compress.prune import channel_rate_for_macs
from effray.compress.recipe import compress_local
from effray.compress.steps import make_optimizer
from effray.config import validated
from effray.hardware import cpu_summary
from effray.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PARQUET = ROOT.parent / "shared" / "data" / "cifar10-train.parquet"
HELD_OUT = 5000  # the parquet's last rows, never trained on: the held-out split without --data


def load_images(path: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``first`` rows for training, the last ``last`` rows for validation (the file
    interleaves the classes, so both are balanced), decoded to uint8 NHWC."""
    from PIL import Image

    table = pq.read_table(path, columns=["image", "label"])
    n = table.num_rows

    def decode(t) -> tuple[np.ndarray, np.ndarray]:
        imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in t.column("image").to_pylist()])
        return imgs, t.column("label").to_numpy().astype(np.int64)

    last = last or HELD_OUT
    first = min(first or n - last, n - last)
    tx, ty = decode(table.slice(0, first))
    vx, vy = decode(table.slice(n - last, last))
    return tx, ty, vx, vy


def load_prepared(data_dir: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``first`` rows of a prepared dataset's train split and the first ``last``
    of its val split (0 = all): with a teacher trained on that dataset, validation stays
    held out from everything the teacher and the fine-tuning saw."""
    from effray.data.images import decode_batch
    from effray.data.prepare import load_meta, split_files

    shape = tuple(load_meta(data_dir)["image_shape"])

    def split(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        table = pq.read_table(split_files(data_dir, name), columns=["image", "label"])
        rows = decode_batch(table.slice(0, n or table.num_rows), shape)
        return rows["image"], rows["label"]

    return (*split("train", first), *split("val", last))


def to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flip + 4-pixel translate (reflect-padded crop) over the whole batch."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + 32, dx : dx + 32]


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(x), generator=g)
    for i in range(0, len(x) - batch + 1, batch):
        idx = order[i : i + batch]
        yield augment(x[idx], g), y[idx]


def train_teacher(
    name: str, width: float, x: torch.Tensor, y: torch.Tensor, minutes: float, batch: int
) -> torch.nn.Module:
    """SGD on a time budget: the step count that fits ``minutes`` (from the first steps'
    speed) sets a warm-up + cosine schedule, so the run ends annealed, not cut off."""
    torch.manual_seed(0)
    model = build_model(name, 10, width=width).train()
    opt = make_optimizer(model, 0.1)
    steps_per_epoch, step, total, start, epoch = len(x) // batch, 0, None, time.perf_counter(), 0
    while total is None or step < total:
        for xb, yb in epoch_batches(x, y, batch, epoch, seed=1):
            if total is not None and step >= total:
                break
            lr = (
                0.1 * min(1.0, (step + 1) / 50) if total is None else 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            )
            for gr in opt.param_groups:
                gr["lr"] = lr
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if total is None and step == 20:
                per_step = (time.perf_counter() - start) / step
                total = max(step + 1, int(minutes * 60 / per_step))
                print(
                    f"teacher: {per_step * 1000:.0f} ms/step -> {total} steps ({total / steps_per_epoch:.1f} epochs)",
                    flush=True,
                )
        epoch += 1
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parquet", default=str(PARQUET))
    p.add_argument("--teacher", default="", help="an effray checkpoint; default: train --model for --minutes here")
    p.add_argument(
        "--data",
        default="",
        help="a prepared dataset (the teacher's): fine-tune on its train split, score on its val split",
    )
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--minutes", type=float, default=4.0, help="CPU minutes for the baseline")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument(
        "--val-images",
        type=int,
        default=0,
        help="images scored (0 = the whole held-out split: a prepared dataset's val split, or the parquet's last "
        "5,000 rows)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--recipes", default="int8,struct50,deep")
    p.add_argument(
        "--kd-features", default="", help="modules the +features recipes distil (the model's names, e.g. stem,block1)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-compression"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_summary()}, {torch.get_num_threads()} thread(s)", flush=True)

    t0 = time.perf_counter()
    if args.data:
        tx, ty, vx, vy = load_prepared(Path(args.data), args.train_images, args.val_images)
    else:
        tx, ty, vx, vy = load_images(Path(args.parquet), args.train_images, args.val_images)
    if args.teacher:
        from effray.train.checkpoint import load_checkpoint

        teacher, payload = load_checkpoint(args.teacher)
        mean, std = torch.tensor(payload["data"]["mean"]), torch.tensor(payload["data"]["std"])
        info = {"path": args.teacher}
    else:
        mean = torch.from_numpy(tx.reshape(-1, 3).mean(0) / 255.0).float()
        std = torch.from_numpy(tx.reshape(-1, 3).std(0) / 255.0).float()
        info = {"path": "", "trained_here": {"model": args.model, "minutes": args.minutes, "images": args.train_images}}
    x, y = to_tensor(tx, mean, std), torch.from_numpy(ty)
    val = [(to_tensor(vx[i : i + 500], mean, std), torch.from_numpy(vy[i : i + 500])) for i in range(0, len(vx), 500)]
    print(f"data: {len(x)} train / {len(vx)} val images in {time.perf_counter() - t0:.0f} s", flush=True)
    data = {"mean": mean.tolist(), "std": std.tolist(), "num_classes": 10, "image_shape": [32, 32, 3]}
    if not args.teacher:
        teacher = train_teacher(args.model, args.width, x, y, args.minutes, args.batch_size)
        # an uncompressed artifact loads like any checkpoint: rerun with --teacher OUT/teacher
        save_artifact(Path(args.out) / "teacher", teacher, data=data, teacher=info, codec="none")
    calib = [next(epoch_batches(x, y, args.batch_size, 99 + i)) for i in range(4)]

    kd = {"kd_alpha": 0.9, "kd_temperature": 4.0}
    recipes = {
        "int8": CompressConfig(finetune_epochs=0, codec="none"),
        "struct50": CompressConfig(
            prune_rate=round(channel_rate_for_macs(0.5), 4),
            prune_kind="structured",
            finetune_epochs=args.finetune_epochs,
            finetune_lr=0.02,
            codec="none",
            **kd,
        ),
        "deep": CompressConfig(
            prune_rate=args.sparsity,
            prune_schedule="cubic",
            prune_steps=max(1, args.finetune_epochs // 2),
            bits=args.bits,
            act_bits=8,
            finetune_epochs=args.finetune_epochs,
            finetune_lr=0.01,
            **kd,
        ),
    }
    for name in ("struct50", "deep"):
        recipes[f"{name}+features"] = dataclasses.replace(recipes[name], kd_features=args.kd_features)
    results, teacher_metrics = {}, None
    for name in args.recipes.split(","):
        t = time.perf_counter()
        if name.endswith("+features") and not args.kd_features:
            p.error(f"--recipes {name} needs --kd-features")
        torch.manual_seed(0)  # a recipe and its +features twin start from the same draws
        cfg = validated(recipes[name])
        r = compress_local(
            teacher,
            cfg,
            lambda e: epoch_batches(x, y, args.batch_size, e),
            calib,
            val,
            Path(args.out) / name,
            teacher_info=info,
            data=data,
            teacher_metrics=teacher_metrics,
            log=lambda line, n=name: print(f"[{n}] {line}", flush=True),
        )
        teacher_metrics = r["teacher"]
        r["seconds"] = time.perf_counter() - t
        results[name] = r
        print(f"[{name}] done in {r['seconds']:.0f} s", flush=True)

    tm = teacher_metrics
    spec = getattr(teacher, "spec", {"name": args.model, "width": args.width})
    print(
        f"\nteacher {spec['name']} w{spec.get('width', 1.0):g}: accuracy {tm['accuracy']:.4f}, {tm['params']} "
        f"params, {tm['macs'] / 1e6:.1f} M MACs, "
        f"{tm['bytes'] / 1024:.0f} KiB fp32, {tm['latency_ms_b1']:.2f} / {tm['latency_ms_b256']:.0f} ms at b1 / "
        f"b256, {tm['threads']} thread(s)"
    )
    # "int8 x": each recipe's int8 runtime vs the same weights in fp32, timed interleaved (a, b, a,
    # b, ...) so load from other processes hits both alike; vs_teacher has the cross-model ratios.
    print(
        f"{'recipe':<18}{'acc':>8}{'int8 acc':>10}{'drop pts':>10}{'KiB':>9}{'size x':>8}{'params x':>10}{'MACs x':>8}"
        f"{'sparse MACs x':>15}{'int8 x b1':>11}{'int8 x b256':>13}"
    )
    for name, r in results.items():
        s, v = r["student"], r["student"]["vs_teacher"]
        print(
            f"{name:<18}{s['accuracy']:>8.4f}{s.get('int8_accuracy', float('nan')):>10.4f}"
            f"{v['accuracy_drop_points']:>10.2f}"
            f"{s['bytes'] / 1024:>9.1f}{v['size_ratio']:>8.1f}{v['params_ratio']:>10.2f}{v['macs_ratio']:>8.2f}"
            f"{v['sparse_macs_ratio']:>15.2f}{s.get('int8_speedup_b1', float('nan')):>11.2f}"
            f"{s.get('int8_speedup_b256', float('nan')):>13.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
