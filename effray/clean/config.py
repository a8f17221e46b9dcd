"""The cleaning step's one config: its fields are ``effray data clean``'s flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.clean.knn import BASELINE
from effray.config import option, require
from effray.models import check_model_name

REASONS = ("duplicates", "leaks", "labels")  # what --drop may name
# the reasons a removed.parquet row carries, and the --drop name that drops it
EMBEDDERS = ("pixels", "classifier")  # --embedder's names (anything else: a checkpoint path)
ROW_REASONS = {"duplicate": "duplicates", "near_duplicate": "duplicates", "leak": "leaks", "label_issue": "labels"}


@dataclass(frozen=True)
class CleanConfig:
    """What to clean, against what, and how hard to look."""

    data: str = option("", "prepared dataset directory (from `effray data prepare`)")
    out: str = option(
        "", "output directory: removed.parquet, clean_report.md/.json, PNG grids (+ OUT/data with --drop)"
    )
    reference: str = option(
        "",
        "another dataset whose images must not be in train (a prepared directory or any `data prepare` source, e.g. "
        "someone else's test set)",
    )
    checkpoint: str = option(
        "", "classifier for the eval splits' label issues (default: one trained here on train, as a Tune trial)"
    )
    trust_code: bool = option(
        False, "import the pkg.module:factory the --checkpoint names to rebuild its model (never on a file's say-so)"
    )
    drop: str = option(
        "", "comma-separated reasons to drop into OUT/data: duplicates, leaks, labels (default: report only)"
    )
    folds: int = option(
        4, "cross-validation folds for the train split's out-of-sample probabilities (each a Tune trial)"
    )
    epochs: int = option(12, "epochs of each fold's (and the eval model's) training")
    model: str = option("convnet", "model the folds train")
    width: float = option(0.5, "width multiplier of --model")
    batch_size: int = option(128, "training batch size of the folds")
    labels: bool = option(True, "look for label issues (--no-labels: duplicates and leaks only, no training)")
    near: bool = option(True, "look for near duplicates (--no-near: exact copies only)")
    embedder: str = option(
        "pixels",
        "what near copies are compared by: pixels (alignment-tolerant pixel similarity, no training), classifier "
        "(features of the model trained here, or of --checkpoint), or a checkpoint path (its classifier's features)",
    )
    near_threshold: float = option(
        0.0,
        "relative score (how much closer than the image's 11th-30th neighbours) above which two images are near "
        "duplicates (0 = calibrate on synthetic copies of --calibration train images)",
    )
    max_fpr: float = option(
        0.03, "calibration: the most real images (share) the threshold may flag as having a near duplicate"
    )
    calibration: int = option(400, "train images whose synthetic copies (light and re-shot) calibrate the threshold")
    neighbours: int = option(5, "nearest neighbours kept per image (pairs a finding or a candidate can come from)")
    shortlist: int = option(50, "candidates per image the kNN's first pass keeps for the pixel alignment search")
    candidates: int = option(1000, "top-scoring candidate pairs written to candidates.parquet for review")
    block_rows: int = option(2048, "rows per kNN block: each task holds block x block similarities, never N x N")
    actors: int = option(2, "most embedding actors (each holds the model; one GPU each when the cluster has GPUs)")
    gpus_per_actor: float = option(
        -1.0, "GPUs per embedding actor and fold trial (-1 = 1 when the cluster has GPUs, else 0)"
    )
    cpus_per_trial: float = option(1.0, "CPUs per fold trial")
    grid_groups: int = option(16, "flagged groups shown per PNG grid")
    seed: int = option(0, "seed for the folds, the calibration sample and training")
    overwrite: bool = option(False, "replace an existing --out")

    def settings(self) -> dict[str, Any]:
        """What decides which rows a clean flags and drops (the report records it, so a
        re-run with the same settings can keep it)."""
        return {
            "near": self.near,
            "labels": self.labels,
            "drop": self.drop,
            "reference": self.reference,
            "embedder": self.embedder,
        }

    @property
    def embedder_checkpoint(self) -> str:
        """The checkpoint ``--embedder`` names ("" for pixels / classifier)."""
        return "" if self.embedder in EMBEDDERS else self.embedder

    @property
    def uses_classifier(self) -> bool:
        """Whether near copies are compared by a classifier's features."""
        return self.embedder != "pixels"

    def validate(self) -> None:
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(bool(self.out), "--out DIR is required (where the report and the cleaned dataset go)")
        check_model_name(self.model)
        require(
            self.folds >= 2,
            f"--folds must be >= 2 (each fold's rows are scored by a model trained on the others), got {self.folds}",
        )
        unknown = sorted(set(drop_reasons(self.drop)) - set(REASONS))
        require(
            not unknown,
            f"unknown --drop reason {', '.join(unknown)}; choose from {', '.join(REASONS)} (comma-separated)",
        )
        require(
            not ("labels" in drop_reasons(self.drop) and not self.labels),
            "--drop labels needs label issues found: drop --no-labels",
        )
        require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        require(self.near_threshold >= 0.0, f"--near-threshold must be >= 0 (0 = calibrate), got {self.near_threshold}")
        require(
            self.embedder in EMBEDDERS or Path(self.embedder).exists(),
            f"--embedder {self.embedder!r} is neither {' nor '.join(EMBEDDERS)} nor a checkpoint that exists",
        )
        require(
            not (self.embedder not in EMBEDDERS and self.checkpoint),
            "--embedder CHECKPOINT and --checkpoint both name a model; pass one (--embedder classifier --checkpoint "
            "CKPT embeds with it)",
        )
        require(
            self.calibration >= 20 or self.near_threshold > 0,
            f"--calibration must be >= 20 images, got {self.calibration}",
        )
        require(0.0 < self.max_fpr < 1.0, f"--max-fpr must be in (0, 1), got {self.max_fpr}")
        require(self.neighbours >= 1, f"--neighbours must be >= 1, got {self.neighbours}")
        require(
            self.shortlist >= max(self.neighbours, BASELINE[1]),
            f"--shortlist must be >= {max(self.neighbours, BASELINE[1])} (--neighbours, and the {BASELINE[1]} "
            f"neighbours each image's baseline is drawn from), got {self.shortlist}",
        )
        require(self.candidates >= 0, f"--candidates must be >= 0, got {self.candidates}")
        require(self.block_rows >= 16, f"--block-rows must be >= 16, got {self.block_rows}")
        require(self.actors >= 1, f"--actors must be >= 1, got {self.actors}")
        require(self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")


def drop_reasons(text: str) -> list[str]:
    """``"duplicates, leaks"`` -> ``["duplicates", "leaks"]``."""
    return [r.strip() for r in str(text).split(",") if r.strip()]
