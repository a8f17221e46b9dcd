"""Any-model benchmark: a torchvision ResNet-18 and a timm ViT-tiny, each trained here on
Imagenette at a reduced size, then compressed by effray's recipe; every figure measured on
the saved artifact (the file read back), with the ratios to the teacher.

For each ``--models`` entry: a teacher trained in-process for ``--minutes`` (random init:
nothing here can download weights), scored on held-out rows (the file's last
``--val-images`` rows, never trained on), then two recipes, the compressed front:

* ``s50-4bit``: structured pruning of half the channels (attention loses whole heads),
  ``--bits``-bit QAT, KD from the teacher;
* ``8bit``:     8-bit QAT of the teacher's own architecture, KD.

``--qat-bn simulate,fold`` runs both recipes once per way QAT treats the BatchNorms (kept
with their fold simulated, or folded first), named ``8bit/fold`` etc. for the second.

    python bench/any_model.py [--size 64] [--minutes 3] [--finetune-epochs 1] [--train-images 2000]
"""

from __future__ import annotations

import argparse
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
from effray.compress.recipe import compress_local
from effray.compress.steps import make_optimizer
from effray.config import validated
from effray.hardware import cpu_summary
from effray.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PARQUET = ROOT.parent / "shared" / "data" / "imagenette-train.parquet"
MODELS = "torchvision:resnet18,timm:vit_tiny_patch16_224?img_size={size}"


def load(path: Path, size: int, first: int, last: int) -> tuple[np.ndarray, ...]:
    """The first ``first`` rows to train on and the last ``last`` held out (the file
    interleaves the classes, so both are balanced), resized to ``size`` px, uint8 NHWC."""
    from PIL import Image

    table = pq.read_table(path, columns=["image", "label"])
    n = table.num_rows

    def decode(t) -> tuple[np.ndarray, np.ndarray]:
        imgs = [
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BILINEAR))
            for b in t.column("image").to_pylist()
        ]
        return np.stack(imgs), t.column("label").to_numpy().astype(np.int64)

    return (*decode(table.slice(0, min(first, n - last))), *decode(table.slice(n - last, last)))


def to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int):
    """Shuffled batches with a random horizontal flip (the whole batch's ops, as effray's)."""
    g = torch.Generator().manual_seed(1000 + epoch)
    order = torch.randperm(len(x), generator=g)
    for i in range(0, len(x) - batch + 1, batch):
        idx = order[i : i + batch]
        flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
        yield torch.where(flip, x[idx].flip(3), x[idx]), y[idx]


def train_teacher(name: str, x: torch.Tensor, y: torch.Tensor, minutes: float, batch: int) -> torch.nn.Module:
    """AdamW on a time budget with a warm-up + cosine schedule sized from the first steps'
    speed, so the run ends annealed rather than cut off."""
    torch.manual_seed(0)
    model = build_model(name, 10).train()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        if "vit" in name
        else make_optimizer(model, 0.1)
    )
    peak = opt.param_groups[0]["lr"]
    step, total, start, epoch = 0, None, time.perf_counter(), 0
    while total is None or step < total:
        for xb, yb in epoch_batches(x, y, batch, epoch):
            if total is not None and step >= total:
                break
            lr = (
                peak * min(1.0, (step + 1) / 20)
                if total is None
                else peak * 0.5 * (1 + math.cos(math.pi * step / total))
            )
            for gr in opt.param_groups:
                gr["lr"] = lr
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if total is None and step == 10:
                per_step = (time.perf_counter() - start) / step
                total = max(step + 1, int(minutes * 60 / per_step))
                print(f"[{name}] teacher: {per_step * 1000:.0f} ms/step -> {total} steps", flush=True)
        epoch += 1
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parquet", default=str(PARQUET))
    p.add_argument("--models", default=MODELS, help="comma-separated references ({size}: --size)")
    p.add_argument("--size", type=int, default=64, help="image size the file's 224 px images are resized to")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--minutes", type=float, default=3.0, help="CPU minutes per teacher")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qat-bn", default="simulate", help="comma-separated --qat-bn values, each a set of recipes")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-any-model"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_summary()}; {args.threads} thread(s)", flush=True)

    tx, ty, vx, vy = load(Path(args.parquet), args.size, args.train_images, args.val_images)
    mean = torch.from_numpy(tx.reshape(-1, 3).mean(0) / 255.0).float()
    std = torch.from_numpy(tx.reshape(-1, 3).std(0) / 255.0).float()
    x, y = to_tensor(tx, mean, std), torch.from_numpy(ty)
    val = [(to_tensor(vx[i : i + 250], mean, std), torch.from_numpy(vy[i : i + 250])) for i in range(0, len(vx), 250)]
    data = {"mean": mean.tolist(), "std": std.tolist(), "num_classes": 10, "image_shape": [args.size, args.size, 3]}
    calib = [next(epoch_batches(x, y, args.batch_size, 99 + i)) for i in range(4)]
    print(f"data: {len(x)} train / {len(vx)} held-out Imagenette images at {args.size} px", flush=True)

    kd = {"kd_alpha": 0.7, "kd_temperature": 4.0, "finetune_epochs": args.finetune_epochs}
    recipes = {}
    for i, bn in enumerate(args.qat_bn.split(",")):
        tag, common = ("" if i == 0 else f"/{bn}"), {**kd, "qat_bn": bn, "finetune_lr": args.finetune_lr}
        recipes[f"s50-4bit{tag}"] = CompressConfig(
            prune_rate=0.5, prune_kind="structured", bits=args.bits, act_bits=8, **common
        )
        recipes[f"8bit{tag}"] = CompressConfig(bits=8, act_bits=8, **common)
    rows, results = [], {}
    for ref in args.models.format(size=args.size).split(","):
        teacher = train_teacher(ref, x, y, args.minutes, args.batch_size)
        out = Path(args.out) / ref.replace(":", "-").replace("?", "-")
        save_artifact(out / "teacher", teacher, data=data, codec="none")
        teacher_metrics = None
        for name, cfg in recipes.items():
            t = time.perf_counter()
            r = compress_local(
                teacher,
                validated(cfg),
                lambda e: epoch_batches(x, y, args.batch_size, e),
                calib,
                val,
                out / name,
                teacher_info={"path": str(out / "teacher")},
                data=data,
                teacher_metrics=teacher_metrics,
                log=lambda line, n=f"{ref} {name}": print(f"[{n}] {line}", flush=True),
            )
            teacher_metrics = r["teacher"]
            results[f"{ref} {name}"] = {**r, "seconds": time.perf_counter() - t}
            rows.append((ref, name, r["student"], teacher_metrics))

    print(f"\n{cpu_summary()}; latency at batch 1, {args.threads} thread(s); ratios are student / teacher")
    print(
        f"{'model':<42}{'recipe':<15}{'acc':>7}{'teacher':>9}{'drop pts':>9}{'KiB':>9}{'size x':>8}"
        f"{'MACs (M)':>10}{'MACs x':>8}{'ms b1':>8}{'lat x':>7}"
    )
    for ref, name, s, tm in rows:
        v = s["vs_teacher"]
        print(
            f"{ref:<42}{name:<15}{s['accuracy']:>7.4f}{tm['accuracy']:>9.4f}{v['accuracy_drop_points']:>9.2f}"
            f"{s['bytes'] / 1024:>9.0f}{v['size_ratio']:>8.1f}{s['macs'] / 1e6:>10.1f}{v['macs_ratio']:>8.2f}"
            f"{s['latency_ms_b1']:>8.2f}{s['latency_ms_b1'] / tm['latency_ms_b1']:>7.2f}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, default=str))
    print(f"results: {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
