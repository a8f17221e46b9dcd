"""What each compression recipe costs beyond accuracy: worst-class recall, calibration, corruptions.

From one teacher, every recipe below is fine-tuned on the same data and its saved
artifact scored on the held-out split: accuracy, macro-F1, worst-class recall, ECE
(15 bins) and the mean accuracy under every corruption of :mod:`effray.data.corrupt`
at severities 1-5 (CIFAR-10-C's mean corruption accuracy). Printed: each score and its
change vs the teacher in points, so a recipe that keeps accuracy but loses robustness
shows it. The corruption score of a model is its own images' (seeded per row): every
model sees the same corrupted images.

    python bench/robustness.py [--data DIR --teacher CKPT] [--images 5000] [--finetune-epochs 2]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from search_efficiency import data_and_teacher, teacher_arguments

ROOT = Path(__file__).resolve().parents[1]
BASE = {"finetune_batch_size": 128, "finetune_lr": 0.01, "calib_batches": 2, "int8": False}
RECIPES: dict[str, dict[str, Any]] = {
    "8-bit QAT": {"bits": 8},
    "4-bit QAT": {"bits": 4},
    "2-bit QAT": {"bits": 2},
    "50 % unstructured": {"prune_rate": 0.5},
    "80 % unstructured": {"prune_rate": 0.8},
    "50 % structured": {"prune_rate": 0.5, "prune_kind": "structured"},
    "50 % unstructured + 4-bit + KD": {"prune_rate": 0.5, "bits": 4, "kd_alpha": 0.7},
}
SCORES = ("accuracy", "macro_f1", "worst_class_recall", "ece", "corruption_accuracy")


def score(
    model: Any, val: dict[str, Any], meta: dict[str, Any], corruptions: list[str], severities: list[int], images: int
) -> dict[str, Any]:
    """The model's scores on ``val``: per class and calibration on all of it, corruption
    accuracy (every corruption, every severity) on its first ``images`` rows."""
    import torch

    from effray.metrics import classification_metrics
    from effray.models.predict import predict_logits
    from effray.train.validate import CorruptionScore

    with torch.no_grad():
        model.eval()
        logits = torch.cat(
            [
                predict_logits(model, val["image"][i : i + 500], meta["mean"], meta["std"])
                for i in range(0, len(val["label"]), 500)
            ]
        )
    m = classification_metrics(
        logits, torch.from_numpy(val["label"]), [str(c) for c in meta.get("classes", range(meta["num_classes"]))]
    )
    per = {n: CorruptionScore((n,), tuple(severities), images, seed=0).score(model, val, meta) for n in corruptions}
    return {
        **{k: m[k] for k in SCORES[:-1]},
        "worst_class": m["worst_class"],
        "corruption_accuracy": sum(per.values()) / len(per),
        "per_corruption": per,
    }


def main() -> int:
    p = teacher_arguments(__doc__)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument(
        "--robust-images", type=int, default=1000, help="val images scored under every corruption and severity"
    )
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from the table above")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-robustness")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    from effray.compress.artifact import load_artifact
    from effray.compress.config import CompressConfig
    from effray.compress.recipe import compress_local
    from effray.config import validated
    from effray.data.arrays import epoch_batches, eval_batches, load_arrays
    from effray.data.corrupt import CORRUPTIONS
    from effray.data.prepare import load_meta

    data, teacher = data_and_teacher(args)
    meta = load_meta(data)
    train, val = load_arrays(data, "train"), load_arrays(data, "val")
    evals = eval_batches(val, meta, 256)
    calib = eval_batches({k: v[:512] for k, v in train.items()}, meta, 256)
    corruptions, severities = list(CORRUPTIONS), [1, 2, 3, 4, 5]
    print(
        f"{len(train['label'])} train / {len(val['label'])} val images; corruption accuracy on the first "
        f"{min(args.robust_images, len(val['label']))} val images x {len(corruptions)} corruptions x 5 severities",
        flush=True,
    )
    rows = [
        {"recipe": "teacher", "bytes": None, **score(teacher, val, meta, corruptions, severities, args.robust_images)}
    ]
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        cfg = validated(CompressConfig(**{**BASE, "finetune_epochs": args.finetune_epochs, **RECIPES[name]}))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = compress_local(
                teacher,
                cfg,
                lambda epoch, bs=cfg.finetune_batch_size: epoch_batches(
                    train, meta, bs, policy="standard", seed=0, epoch=epoch, device="cpu"
                ),
                calib,
                evals,
                tmp,
                log=lambda line: None,
            )
            model, _ = load_artifact(tmp)
            rows.append(
                {
                    "recipe": name,
                    "bytes": result["student"]["bytes"],
                    "size_ratio": result["student"]["vs_teacher"].get("size_ratio"),
                    **score(model, val, meta, corruptions, severities, args.robust_images),
                    "seconds": time.perf_counter() - started,
                }
            )
        print_row(rows[-1], rows[0], header=len(rows) == 2)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "worst_class_recall": "worst class",
    "ece": "ECE",
    "corruption_accuracy": "corruptions",
}


def print_row(row: dict[str, Any], teacher: dict[str, Any], header: bool) -> None:
    if header:
        print(
            f"{'recipe':<32}{'size':>7}"
            + "".join(f"{LABELS[k]:>15}" for k in SCORES)
            + "   (%, change vs teacher in points)"
        )
        print(f"{'teacher':<32}{'1x':>7}" + "".join(f"{100 * teacher[k]:>8.1f}{'':>7}" for k in SCORES))
    print(
        f"{row['recipe']:<32}{row['size_ratio']:>6.1f}x"
        + "".join(f"{100 * row[k]:>8.1f}{100 * (row[k] - teacher[k]):>+7.1f}" for k in SCORES),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
