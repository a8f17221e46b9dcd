"""The configs of `effray synth train|sample|score`: one frozen dataclass per command.

Field names are flags (``--gen-width``, ``--per-class``), so they stay unique within a
command; the train config is also what the Ray Train workers rebuild (``from_dict``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effray.config import option, require, require_whole_gpus

# Fields that don't change what a run computes: a re-run may change them and still resume.
NOT_ARCH = {
    "data",
    "out",
    "epochs",
    "workers",
    "gpus_per_worker",
    "cpus_per_worker",
    "data_cpus",
    "max_failures",
    "name",
    "keep_checkpoints",
}


@dataclass(frozen=True)
class SynthTrainConfig:
    """A class-conditional GAN trained data-parallel on Ray Train."""

    data: str = option(
        "",
        "prepared dataset directory (from `effray data prepare`); the GAN learns its train split",
    )
    out: str = option("", "output directory: the Ray Train run (checkpoints) and the final generator.pt")
    epochs: int = option(20, "passes over the training split")
    workers: int = option(1, "data-parallel workers (Ray Train workers)")
    batch_size: int = option(64, "global batch size: real images per step across all workers")
    z_dim: int = option(128, "latent dimension")
    gen_width: int = option(64, "generator base channels (4x at 4x4, down to 1x at 32x32)")
    disc_width: int = option(64, "discriminator base channels (1x at 32x32, up to 8x at 4x4)")
    lr_g: float = option(2e-4, "generator Adam learning rate")
    lr_d: float = option(2e-4, "discriminator Adam learning rate")
    beta1: float = option(0.5, "Adam beta1 (both networks)")
    beta2: float = option(0.999, "Adam beta2 (both networks)")
    augment: str = option("flip", "augmentation of the real images the discriminator sees (a policy chain)")
    limit: int = option(0, "train on the first N training rows only (0 = all)")
    seed: int = option(0, "seed for init, noise, shuffling and augmentation")
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 trains on GPUs with NCCL, 0 on CPUs with gloo")
    cpus_per_worker: float = option(1.0, "logical CPUs per worker (torch threads = max(1, floor(this)))")
    data_cpus: float = option(1.0, "logical CPUs per Ray Data decode/augment task")
    keep_checkpoints: int = option(2, "checkpoints to keep (the newest)")
    max_failures: int = option(2, "worker-group restarts from the latest checkpoint before giving up")
    name: str = option("gan", "run name inside --out; the same --out/--name resumes that run")

    def validate(self) -> None:
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(bool(self.out), "--out DIR is required")
        for flag, value in (
            ("--epochs", self.epochs),
            ("--workers", self.workers),
            ("--batch-size", self.batch_size),
            ("--z-dim", self.z_dim),
            ("--gen-width", self.gen_width),
            ("--disc-width", self.disc_width),
            ("--keep-checkpoints", self.keep_checkpoints),
        ):
            require(value > 0, f"{flag} must be a positive integer, got {value}")
        require(
            self.batch_size % self.workers == 0 and self.batch_size // self.workers >= 2,
            f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}, >= 2 images each",
        )
        require(self.lr_g > 0 and self.lr_d > 0, "--lr-g and --lr-d must be > 0")
        require_whole_gpus(self.workers, self.gpus_per_worker)
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(
            self.gpus_per_worker >= 0 and self.cpus_per_worker > 0 and self.data_cpus > 0,
            "--gpus-per-worker must be >= 0, --cpus-per-worker and --data-cpus > 0",
        )
        require(self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}")
        require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) is not None,
            f"--name {self.name!r} may use letters, digits, '_', '.', '-' only",
        )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(frozen=True)
class SynthSampleConfig:
    """Synthetic images from a trained generator, as a canonical dataset."""

    generator: str = option("", "generator.pt from `effray synth train`")
    per_class: int = option(100, "images per class")
    out: str = option("", "output directory: a prepared dataset (train split, synthetic=true) + samples.png")
    seed: int = option(0, "seed: row i's latent is drawn from (seed, i)")
    batch_size: int = option(256, "images per generator call")
    actors: int = option(2, "generator actors (Ray Data ActorPoolStrategy size)")
    gpus_per_actor: float = option(-1.0, "GPUs per generator actor; -1 = 1 when the cluster has GPUs, else 0")
    grid_columns: int = option(10, "images per class (row) in samples.png")
    classifier: str = option(
        "",
        "optional: a checkpoint trained on real data; adds quality.json (see `effray synth score`)",
    )
    real: str = option("", "prepared real dataset for the quality figures (default: the generator's training data)")
    overwrite: bool = option(False, "replace an existing output directory")

    def validate(self) -> None:
        require(
            bool(self.generator),
            "--generator PATH is required (generator.pt from `effray synth train`)",
        )
        require(bool(self.out), "--out DIR is required")
        require(self.per_class >= 1, f"--per-class must be >= 1, got {self.per_class}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.actors >= 1, f"--actors must be >= 1, got {self.actors}")
        require(
            self.gpus_per_actor == -1 or self.gpus_per_actor >= 0,
            "--gpus-per-actor must be -1 (auto) or >= 0",
        )
        require(self.grid_columns >= 1, f"--grid-columns must be >= 1, got {self.grid_columns}")


@dataclass(frozen=True)
class SynthScoreConfig:
    """Quality figures of a synthetic dataset, measured with our own classifier."""

    synthetic: str = option("", "synthetic dataset from `effray synth sample`")
    classifier: str = option("", "a checkpoint trained on real data (effray train)")
    real: str = option("", "prepared real dataset to compare with")
    split: str = option("val", "real split to compare with (keep it out of the classifier's training)")
    max_rows: int = option(5000, "use at most this many rows of each side")

    def validate(self) -> None:
        require(bool(self.synthetic), "--synthetic DIR is required (from `effray synth sample`)")
        require(
            bool(self.classifier),
            "--classifier PATH is required (a checkpoint trained on real data)",
        )
        require(bool(self.real), "--real DIR is required (the prepared real dataset)")
        require(self.max_rows >= 2, f"--max-rows must be >= 2, got {self.max_rows}")
