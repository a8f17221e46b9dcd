"""Augmentation policies: text parsed into a chain of batch ops, run wherever the batch is.

There is one implementation of every op (:mod:`effray.data.augment_ops`,
:mod:`effray.data.augment_auto`): pure functions over uint8 NHWC torch tensors. It runs
in each place effray augments:

- on the CPU in Ray Data ``map_batches`` tasks (:func:`augment_arrays`): the numpy
  columns are wrapped as tensors without a copy and torch is held to the task's CPUs;
- on the CPU in a search trial's epochs (:func:`effray.data.arrays.epoch_batches`);
- on the training device with ``--augment-on gpu`` (:func:`augment_on_device`).

Every batch's generator comes from ``(seed, epoch, key)`` (:func:`batch_generator`): the
same batch is augmented alike wherever it runs, and each epoch afresh.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from effray.config import require
from effray.data import augment_auto, augment_ops, augment_size
from effray.data.augment_spec import OPS, Batch, OpList, format_ops, parse_ops
from effray.data.images import channel_stats, normalize_tensor
from effray.errors import EffrayError

OP_MODULES = (augment_ops, augment_auto, augment_size)  # importing them registers their ops in OPS
OP_COLUMNS = ("image", "label", "index", "synthetic", "target")  # the columns ops read or write


@dataclass(frozen=True)
class Policy:
    """A parsed chain of ops: ``policy(batch, generator) -> batch`` applies them in order.

    Adjacent geometric pairs with a fused version (:data:`~effray.data.augment_ops.FUSED_PAIRS`:
    crop then flip or altflip, flip then rotate) run as one pixel gather, drawing the same numbers in
    the same order, so the output is the pair's, pixel for pixel, at one pass's cost."""

    chain: OpList
    num_classes: int

    @property
    def ops(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, dict(params)) for name, params in self.chain]

    @property
    def mixes_labels(self) -> bool:
        return any(OPS.get(name).mixes_labels for name, _ in self.chain)

    @property
    def is_identity(self) -> bool:
        return not self.chain

    @property
    def random(self) -> bool:
        """Whether any op draws from the generator (a model's preprocessing must not)."""
        return any(OPS.get(name).random for name, _ in self.chain)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h, w) of what the chain makes of ``h`` x ``w`` images."""
        for name, params in self.chain:
            h, w = OPS.get(name).output_size(params, h, w)
        return h, w

    def __str__(self) -> str:
        return format_ops(self.chain)

    def extra(self, name: str, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
        """What an op gets besides its parameters: num_classes for the label mixers, the
        seed and epoch for ops keyed by row (``altflip``)."""
        spec = OPS.get(name)
        return {
            **({"num_classes": self.num_classes} if spec.mixes_labels else {}),
            **({"seed": int(seed), "epoch": int(epoch)} if spec.keyed else {}),
        }

    def __call__(self, batch: Batch, generator: torch.Generator, *, seed: int = 0, epoch: int = 0) -> Batch:
        img = batch["image"]
        if not torch.is_tensor(img) or img.dtype != torch.uint8 or img.dim() != 4 or img.shape[-1] not in (1, 3):
            what = f"{img.dtype} {tuple(img.shape)}" if hasattr(img, "shape") else type(img).__name__
            raise EffrayError(f"augment expects a uint8 NHWC image tensor (C=1 or 3), got {what}")
        if generator.device.type != img.device.type:
            raise EffrayError(
                f"the generator is on {generator.device}, the images on {img.device}; "
                "create the generator on the images' device"
            )
        out, i = dict(batch), 0
        while i < len(self.chain):
            ops = [(name, {**params, **self.extra(name, seed, epoch)}) for name, params in self.chain[i : i + 2]]
            fused = augment_ops.FUSED_PAIRS.get((ops[0][0], ops[1][0])) if len(ops) == 2 else None
            result = fused(out, generator, ops[0][1], ops[1][1]) if fused else None
            if result is not None:
                out, i = result, i + 2
            else:
                name, params = ops[0]
                out, i = OPS.get(name).fn(out, generator, **params), i + 1
        return out


@functools.lru_cache(maxsize=64)
def parse_policy(text: str, num_classes: int) -> Policy:
    """Parse a policy once (cached: the pipeline calls this per batch). num_classes is
    what mixup/cutmix need to build one-hot targets."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EffrayError(f"num_classes must be a positive int, got {num_classes!r}")
    return Policy(parse_ops(text), num_classes)


# ------------------------------------------------------------------ randomness


def batch_seed(seed: int, epoch: int, key: int) -> int:
    """The seed of one batch's generator: same (seed, epoch, key) -> same augmentations, a
    new epoch -> fresh ones, wherever the batch happens to be processed."""
    return int(np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(key)])).integers(2**63))


def batch_generator(seed: int, epoch: int, key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`batch_seed`."""
    return new_generator(device).manual_seed(batch_seed(seed, epoch, key))


def new_generator(device: str | torch.device) -> torch.Generator:
    """A fresh generator on ``device`` (the seam the fake-CUDA tests replace: a real CUDA
    generator needs a driver)."""
    return torch.Generator(device=device)


# ------------------------------------------------------------------ where batches are augmented


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads held to ``threads`` (a Ray task's CPUs) for the block:
    more would oversubscribe the cores that the node's other tasks were given."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def augment_arrays(
    batch: dict[str, np.ndarray],
    policy: Policy,
    generator: torch.Generator,
    *,
    seed: int = 0,
    epoch: int = 0,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """The policy over a batch of numpy columns on the CPU (a Ray Data ``map_batches``
    call): the columns the ops use are wrapped as tensors sharing the arrays' memory (the
    ops never write their inputs, so Ray's read-only views serve), and new outputs are
    handed back as arrays over the tensors' memory. Columns the ops left alone come back
    as the very arrays that came in (read-only stays read-only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {k: torch.from_numpy(np.asarray(v)) if k in OP_COLUMNS else v for k, v in batch.items()}
    with torch_threads(max(1, int(threads))):
        out = policy(tensors, generator, seed=seed, epoch=epoch)
    given = {id(tensors[k]): batch[k] for k in tensors}
    return {k: given.get(id(v), v.numpy() if torch.is_tensor(v) else v) for k, v in out.items()}


# ------------------------------------------------------------------ the model's input size and preprocessing

AUTO_PREPROCESS = "auto"  # --preprocess: the default for the model's input size


def default_preprocess(shape: Any) -> str:
    """The preprocessing of a model that takes ``shape`` (HWC) images: the short side resized
    to the input's, then the centre cropped to it (torchvision's ``Resize`` + ``CenterCrop``).
    It leaves images already of that size untouched."""
    h, w = int(shape[0]), int(shape[1])
    return format_ops(parse_ops(f"resize({min(h, w)})|center_crop({h}, {0 if w == h else w})"))


def input_spec(shape: Any, augment: str, num_classes: int, preprocessing: str = AUTO_PREPROCESS) -> dict[str, Any]:
    """What a model trained on stored ``shape`` (HWC) images with ``augment`` takes:
    ``{"image_shape": [h, w, c], "preprocess": chain}``, recorded in its checkpoint. The size
    is what the augmentation makes of the stored images; the preprocessing (``auto``:
    :func:`default_preprocess`) must draw nothing and make that size of them too, since it is
    what validation, evaluation and deployment apply instead of the augmentation."""
    h, w = parse_policy(augment, num_classes).output_size(int(shape[0]), int(shape[1]))
    text = default_preprocess((h, w)) if preprocessing == AUTO_PREPROCESS else preprocessing
    policy = parse_policy(text, num_classes)
    require(
        not policy.random,
        f"--preprocess {preprocessing!r} draws random numbers; a model's preprocessing is resize(S) and center_crop(S)",
    )
    got = policy.output_size(int(shape[0]), int(shape[1]))
    require(
        got == (h, w),
        f"--preprocess {preprocessing!r} makes {got[0]}x{got[1]} of the stored {shape[0]}x{shape[1]} images, but "
        f"--augment makes {h}x{w}: end both at the model's input size (or leave --preprocess auto)",
    )
    return {"image_shape": [h, w, int(shape[2])], "preprocess": format_ops(policy.chain)}


def preprocess(images: torch.Tensor, text: str | None) -> torch.Tensor:
    """A model's preprocessing (a chain of ops that draw nothing: ``resize``, ``center_crop``)
    over a uint8 NHWC batch on any device. ``None`` or ``"none"`` is no preprocessing, and
    images already of the size the chain makes come back untouched (its ops pass them on)."""
    if not text or text == "none":
        return images
    policy = parse_policy(text, 1)
    if policy.random:
        raise EffrayError(f"preprocessing {text!r} draws random numbers; use resize(S) and center_crop(S) only")
    batch = {"image": images}
    for name, params in policy.chain:
        batch = OPS.get(name).fn(batch, None, **params)
    return batch["image"]


def model_input(
    images: torch.Tensor, preprocessing: str | None, mean: Any, std: Any, channels_last: bool = False
) -> Any:
    """uint8 NHWC images (any device) -> what the model takes: its preprocessing (rows stored
    at another size), then effray's normalisation to float32 NCHW (``mean``/``std``: lists, or
    :func:`~effray.data.images.channel_stats` already on the images' device)."""
    return normalize_tensor(preprocess(images, preprocessing), mean, std, channels_last)


def preprocess_image(image: np.ndarray, text: str | None) -> np.ndarray:
    """:func:`preprocess` of one HWC uint8 image (a row of any size: ``data prepare
    --image-size``, ``effray predict`` and ``effray serve`` meeting an image of another size)."""
    return preprocess(torch.from_numpy(np.ascontiguousarray(image))[None], text)[0].numpy()


def device_augmentation(policy: str, num_classes: int, mean: Any, std: Any, device: torch.device) -> tuple[Policy, Any]:
    """``--augment-on gpu``: the parsed policy and the normalisation stats on ``device``,
    made once per worker for :func:`augment_on_device`."""
    return parse_policy(policy, num_classes), channel_stats(mean, std, device)


def augment_on_device(
    batch: dict[str, Any],
    policy: Policy,
    stats: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    key: tuple[int, int, int, int],
    channels_last: bool = False,
) -> dict[str, Any]:
    """``--augment-on gpu``: uint8 NHWC batch -> augmented, normalised NCHW on the device,
    with a generator seeded from (seed, epoch, rank, step) so runs repeat exactly.
    ``stats``: :func:`effray.data.images.channel_stats` on ``device``, made once."""
    seed, epoch, rank, step = key
    g = batch_generator(seed, epoch, (rank << 32) + step, device)
    out = policy({k: v.to(device, non_blocking=True) for k, v in batch.items()}, g, seed=seed, epoch=epoch)
    out["image"] = normalize_tensor(out["image"], *stats, channels_last)
    return out
