"""airbench94's own training loop on effray's prepared split: the reference that separates
effray's recipe from the data it is measured on.

airbench94 (github.com/KellerJordan/cifar10-airbench, ``airbench94.py``) publishes 94.01 %
after 9.9 epochs of the 50,000 official training images, scored on the official test
split. effray's goal is stated on its own 45,000 / 5,000 split after 10 epochs. This runs
airbench94's code path (its network, init, optimizer, loss, schedule, lookahead, data
order, alternating flip, translate and test-time augmentation; written out here, no
effray code on the training path) in one process on the same prepared arrays, and
prints validation accuracy after every epoch, so ``bench/time_to_accuracy.py`` has an
anchor on the same images: a gap between the two is effray's, not the split's.

Faithful to airbench94 except where a CPU forces otherwise: float32 instead of fp16/bf16
autocast. ``--width`` scales its widths (64/256/256) for a quicker A/B; ``--drop-last``
(airbench's default) drops the last partial batch of every epoch.

    python bench/airbench_reference.py --data runs/cifar10-45k --epochs 10 [--width 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effray.data.arrays import load_arrays
from effray.data.prepare import load_meta
from effray.hardware import cpu_summary

HYP = {
    "lr": 11.5,
    "momentum": 0.85,
    "weight_decay": 0.0153,
    "bias_scaler": 64.0,
    "label_smoothing": 0.2,
    "whiten_bias_epochs": 3,
    "translate": 2,
    "batchnorm_momentum": 0.6,
    "scaling_factor": 1 / 9,
    "tta_level": 2,
}


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, momentum: float, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False  # airbench: no learned scale


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, momentum: float) -> None:
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout, momentum)
        self.conv2, self.norm2, self.activ = Conv(cout, cout), BatchNorm(cout, momentum), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Mul(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_net(width: float) -> nn.Sequential:
    w1, w2, w3 = (max(1, round(c * width)) for c in (64, 256, 256))
    whiten_width = 2 * 3 * 2**2
    net = nn.Sequential(
        nn.Conv2d(3, whiten_width, 2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(whiten_width, w1, HYP["batchnorm_momentum"]),
        ConvGroup(w1, w2, HYP["batchnorm_momentum"]),
        ConvGroup(w2, w3, HYP["batchnorm_momentum"]),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(w3, 10, bias=False),
        Mul(HYP["scaling_factor"]),
    )
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def init_whitening_conv(layer: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    c, (h, w) = images.shape[1], layer.weight.shape[2:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    flat = patches.view(len(patches), -1)
    values, vectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    values, vectors = values.flip(0).view(-1, 1, 1, 1), vectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = vectors / torch.sqrt(values + eps)
    layer.weight.data[:] = torch.cat((scaled, -scaled))


class LookaheadState:
    def __init__(self, net: nn.Module) -> None:
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net: nn.Module, decay: float) -> None:
        for ema, param in zip(self.net_ema.values(), net.state_dict().values()):
            if param.dtype in (torch.half, torch.float):
                ema.lerp_(param, 1 - decay)
                param.copy_(ema)


def batch_crop(images: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    r = (images.size(-1) - crop) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2), generator=g)
    out = torch.empty((len(images), 3, crop, crop), dtype=images.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[mask] = images[mask, :, r + sy : r + sy + crop, r + sx : r + sx + crop]
    return out


def infer(net: nn.Module, images: torch.Tensor, tta_level: int, batch: int = 2000) -> torch.Tensor:
    def mirror(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * net(x) + 0.5 * net(x.flip(-1))

    def mirror_translate(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1,) * 4, "reflect")
        shifted = [mirror(padded[:, :, 0:32, 0:32]), mirror(padded[:, :, 2:34, 2:34])]
        return 0.5 * mirror(x) + 0.5 * torch.stack(shifted).mean(0)

    fn = [net, mirror, mirror_translate][tta_level]
    net.eval()
    with torch.no_grad():
        return torch.cat([fn(x.contiguous(memory_format=torch.channels_last)) for x in images.split(batch)])


def normalised(arrays: dict, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(arrays["image"]).permute(0, 3, 1, 2).float().div_(255)
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def make_optimizer(net: nn.Module, batch: int) -> torch.optim.SGD:
    """airbench94's SGD on a *summed* loss: lr and weight decay "per 1024 examples",
    decoupled from the momentum; BatchNorm biases at 64x the lr, decayed at the same rate."""
    kilostep_scale = 1024 * (1 + 1 / (1 - HYP["momentum"]))
    lr = HYP["lr"] / kilostep_scale
    wd = HYP["weight_decay"] * batch / kilostep_scale
    lr_biases = lr * HYP["bias_scaler"]
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    other = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    return torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
            dict(params=other, lr=lr, weight_decay=wd / lr),
        ],
        momentum=HYP["momentum"],
        nesterov=True,
    )


def lr_factor(total_steps: int) -> Callable[[int], float]:
    """airbench94's triangle: 0.2 -> 1 over the first 23 % of the steps -> 0.07."""
    warmup = int(total_steps * 0.23)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.2 + 0.8 * step / warmup
        return 1.0 - 0.93 * (step - warmup) / (total_steps - warmup)

    return factor


def run(
    data: str,
    epochs: float = 10,
    width: float = 1.0,
    seed: int = 0,
    batch: int = 1024,
    drop_last: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train airbench94 on ``data``'s train split; score its val split after every epoch
    (no TTA, as airbench prints) and at the end with TTA. Returns ``{"epochs": [{"epoch",
    "train_loss", "val_accuracy", "images_per_s"}...], "val_accuracy": <with TTA>,
    "train_s": ..., "steps": ...}``."""
    meta = load_meta(data)
    # airbench normalises with CIFAR-10's mean/std; the prepared split carries its own (fractions of 255)
    mean, std = (torch.tensor(meta[k], dtype=torch.float32) for k in ("mean", "std"))
    train, val = load_arrays(data, "train"), load_arrays(data, "val")
    images, labels = normalised(train, mean, std), torch.from_numpy(train["label"])
    val_images, val_labels = normalised(val, mean, std), torch.from_numpy(val["label"])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    steps_per_epoch = len(images) // batch if drop_last else math.ceil(len(images) / batch)
    total_steps = math.ceil(steps_per_epoch * epochs)
    net = make_net(width)
    init_whitening_conv(net[0], images[:5000])
    optimizer = make_optimizer(net, batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps))
    lookahead = None  # from epoch 3 on, every 5 steps; each epoch ends on the EMA (decay 1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")

    # epoch 0's random flips are baked in, then every odd epoch flips all: the alternating flip
    flipped = torch.where(torch.rand(len(images), 1, 1, 1, generator=g) < 0.5, images.flip(-1), images)
    padded = F.pad(flipped, (HYP["translate"],) * 4, "reflect")
    log(
        f"airbench94 reference: {len(images):,} train / {len(val_images):,} val images, {steps_per_epoch} steps "
        f"per epoch, {total_steps} steps, width {width:g}, seed {seed}"
    )
    step, t_train, history = 0, 0.0, []
    for epoch in range(math.ceil(epochs)):
        t0 = time.perf_counter()
        net.train()
        net[0].bias.requires_grad = epoch < HYP["whiten_bias_epochs"]
        epoch_images = batch_crop(padded, 32, g)
        if epoch % 2 == 1:
            epoch_images = epoch_images.flip(-1)
        order = torch.randperm(len(images), generator=g)
        losses, rows = [], 0
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            x = epoch_images[idx].contiguous(memory_format=torch.channels_last)
            loss = loss_fn(net(x), labels[idx]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item() / len(idx))
            rows += len(idx)
            step += 1
            if epoch >= 3 and step % 5 == 0:
                if lookahead is None:
                    lookahead = LookaheadState(net)
                else:
                    lookahead.update(net, decay=0.95**5 * (step / total_steps) ** 3)
            if step >= total_steps:
                break
        if lookahead is not None:
            lookahead.update(net, decay=1.0)
        train_s = time.perf_counter() - t0
        t_train += train_s
        acc = (infer(net, val_images, 0).argmax(1) == val_labels).float().mean().item()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "val_accuracy": acc,
                "images_per_s": rows / train_s,
            }
        )
        log(
            f"airbench94 reference epoch {epoch + 1}: train_loss {history[-1]['train_loss']:.4f} "
            f"val_acc {acc:.4f} ({rows / train_s:.0f} img/s)"
        )
        if step >= total_steps:
            break
    tta = (infer(net, val_images, HYP["tta_level"]).argmax(1) == val_labels).float().mean().item()
    return {"epochs": history, "val_accuracy": tta, "train_s": t_train, "steps": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", default="runs/cifar10-45k", help="a prepared split (effray data prepare / time_to_accuracy)"
    )
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_summary()}, {torch.get_num_threads()} threads", flush=True)
    out = run(
        args.data,
        args.epochs,
        args.width,
        args.seed,
        args.batch_size,
        args.drop_last,
        log=lambda line: print(line, flush=True),
    )
    print(
        f"val_accuracy={out['val_accuracy']:.4f} (tta {HYP['tta_level']}) "
        f"val_accuracy_no_tta={out['epochs'][-1]['val_accuracy']:.4f} steps={out['steps']} "
        f"train_minutes={out['train_s'] / 60:.1f}"
    )


if __name__ == "__main__":
    main()
