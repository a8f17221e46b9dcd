"""The class-conditional GAN: a DCGAN-style generator with conditional BatchNorm and a
projection discriminator with spectral norm, trained with the hinge loss.

Why this design: on 32x32 images it is the smallest conditional GAN known to train
stably without tuning (SNGAN, Miyato & Koyama 2018). Spectral norm bounds the
discriminator's Lipschitz constant, the projection term ``<embed(y), phi(x)>`` makes
the class a first-class input of the critic (ACGAN's auxiliary classifier tends to
collapse classes to their easiest modes), and conditional BatchNorm lets every class
set its own feature scales in every generator layer.

Images are NCHW floats in [-1, 1]; :func:`to_uint8` / :func:`from_uint8` convert to and
from the canonical dataset's uint8 NHWC pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; the scale and shift are looked up per class."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gamma(y)[:, :, None, None] * self.bn(x) + self.beta(y)[:, :, None, None]


class UpBlock(nn.Module):
    """CBN -> ReLU -> transposed conv (x2 resolution)."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm2d(in_ch, num_classes)
        self.conv = nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.norm(x, y)))


class Generator(nn.Module):
    """z, y -> 32x32 image in [-1, 1]: linear to 4x4x(4w), three up-blocks, a 3x3 conv."""

    def __init__(
        self, num_classes: int, z_dim: int = 128, width: int = 64, channels: int = 3, image_size: int = 32
    ) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError(f"the generator makes 32x32 images, not {image_size}x{image_size}")
        self.spec = {
            "num_classes": num_classes,
            "z_dim": z_dim,
            "width": width,
            "channels": channels,
            "image_size": image_size,
        }
        self.z_dim, self.num_classes = z_dim, num_classes
        w = width
        self.fc = nn.Linear(z_dim, 4 * 4 * 4 * w)
        self.blocks = nn.ModuleList(
            [UpBlock(4 * w, 2 * w, num_classes), UpBlock(2 * w, w, num_classes), UpBlock(w, w, num_classes)]
        )
        self.out_norm = nn.BatchNorm2d(w)
        self.out = nn.Conv2d(w, channels, 3, padding=1)
        self.start = 4 * w

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), self.start, 4, 4)
        for block in self.blocks:
            x = block(x, y)
        return torch.tanh(self.out(F.relu(self.out_norm(x))))


class Discriminator(nn.Module):
    """x, y -> one score per image: spectrally normalised convs (32 -> 16 -> 8 -> 4),
    global sum pooling to features phi(x), then ``linear(phi) + <embed(y), phi>``."""

    def __init__(self, num_classes: int, width: int = 64, channels: int = 3) -> None:
        super().__init__()
        self.spec = {"num_classes": num_classes, "width": width, "channels": channels}
        w = width
        plan = [
            (channels, w, 3, 1),
            (w, w, 4, 2),
            (w, 2 * w, 3, 1),
            (2 * w, 2 * w, 4, 2),
            (2 * w, 4 * w, 3, 1),
            (4 * w, 4 * w, 4, 2),
            (4 * w, 8 * w, 3, 1),
        ]
        self.convs = nn.ModuleList(spectral_norm(nn.Conv2d(i, o, k, stride=s, padding=1)) for i, o, k, s in plan)
        self.linear = spectral_norm(nn.Linear(8 * w, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 8 * w))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return x.sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = self.features(x)
        return self.linear(phi).squeeze(1) + (self.embed(y) * phi).sum(dim=1)


def d_hinge_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def g_hinge_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def gan_step(
    g: nn.Module,
    d: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    labels: torch.Tensor,
    z_dim: int,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One discriminator step, then one generator step; returns (d_loss, g_loss), detached
    on the device (reading them here would make the host wait for the GPU every step).

    Real and fake go through the discriminator in one call (one DDP forward per
    backward); fake labels are drawn uniformly so every class gets trained equally."""
    n = len(real)
    z = torch.randn(n, z_dim, device=real.device)
    fake_y = torch.randint(0, num_classes, (n,), device=real.device)
    with torch.no_grad():
        fake = g(z, fake_y)
    scores = d(torch.cat([real, fake]), torch.cat([labels, fake_y]))
    d_loss = d_hinge_loss(scores[:n], scores[n:])
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    z = torch.randn(n, z_dim, device=real.device)
    g_loss = g_hinge_loss(d(g(z, fake_y), fake_y))
    opt_g.zero_grad(set_to_none=True)
    d.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return d_loss.detach(), g_loss.detach()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC numpy."""
    x = ((images.detach().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def row_noise(seed: int, ids: np.ndarray, z_dim: int) -> torch.Tensor:
    """One latent per row, derived from (seed, row id) alone: a row's image doesn't depend
    on which batch or actor generated it."""
    z = np.stack([np.random.default_rng([seed, int(i)]).standard_normal(z_dim) for i in ids])
    return torch.from_numpy(z.astype(np.float32))


def generate(g: Generator, labels: np.ndarray, ids: np.ndarray, seed: int, device: Any = "cpu") -> np.ndarray:
    """uint8 NHWC images for ``labels``, row ``i`` drawn from ``row_noise(seed, ids[i])``;
    eval mode (running BN statistics), so images don't depend on the batch either."""
    g.eval()
    with torch.no_grad():
        z = row_noise(seed, ids, g.z_dim).to(device)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        return to_uint8(g(z, y))
