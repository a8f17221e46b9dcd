"""Does the temperature fitted on val hold on images it was not fitted on?

A search fits each front model's and the teacher's temperature T on the val split and
reports ECE after T on that same split (selection-biased). This takes an ``effray run``
output (``--run runs/demo``: its teacher, its report's front, the data it prepared) and
scores the same models on ``--images`` rows of the source that the run never saw (the
source's last rows; the run prepared its first ``limit`` rows): ECE and NLL at T = 1 and at
the recorded T, beside the val figures the report gives. The teacher's T is the one in
``teacher.json`` (its checkpoint records none); an artifact's is the one it records, as
``effray serve`` applies it.

    .venv/bin/python bench/calibration.py --run runs/demo --source ../shared/data/cifar10-train.parquet
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image

from effray.deploy.model import load_deployable
from effray.hardware import cpu_summary
from effray.metrics import classification_metrics, scaled_calibration


def held_out(source: Path, images: int, seen: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``images`` rows of a Parquet source (PNG/JPEG bytes + label) as uint8 NHWC,
    refusing rows the run prepared (its first ``seen``)."""
    table = pq.read_table(source, columns=["image", "label"])
    start = table.num_rows - images
    if start < seen:
        raise SystemExit(f"only {table.num_rows - seen} rows of {source} are unseen by the run; pass --images <= that")
    rows = table.slice(start, images).to_pydict()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in rows["image"]])
    return pixels, np.asarray(rows["label"], np.int64)


def scores(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    before = classification_metrics(z, y, [str(i) for i in range(z.shape[1])])
    after = scaled_calibration(z, y, temperature=temperature)
    return {"accuracy": before["accuracy"], "ece": before["ece"], "nll": before["nll"], **after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="an `effray run` output directory")
    p.add_argument("--source", type=Path, default=Path("../shared/data/cifar10-train.parquet"))
    p.add_argument("--images", type=int, default=10_000, help="held-out rows, from the end of --source")
    args = p.parse_args()
    torch.set_num_threads(2)
    run = args.run.resolve()
    meta = json.loads((run / "data" / "meta.json").read_text())
    seen = int(meta.get("limit") or sum(meta["counts"].values()))
    images, labels = held_out(args.source, args.images, seen)
    teacher = json.loads((run / "compress" / "teacher.json").read_text())
    table = pd.read_parquet(run / "compress" / "report" / "results.parquet")
    front = table[table["pareto_bytes"]].sort_values("bytes")
    models = [("teacher", sorted((run / "teacher" / "teacher").glob("epoch-*"))[-1], teacher, teacher["temperature"])]
    models += [(str(r["trial_id"]), Path(r["artifact"]).parent, r, None) for _, r in front.iterrows()]
    print(f"# calibration on {len(labels):,} held-out rows of {args.source.name} (the run prepared its first {seen:,})")
    print(f"# {cpu_summary()}")
    print("| model | T (fitted on val) | val ECE → after T | held-out ECE → after T | held-out NLL → after T |")
    print("|---|---|---|---|---|")
    for name, path, val, recorded in models:
        model = load_deployable(path, device="cpu")
        t = float(recorded) if recorded is not None else model.info.temperature
        s = scores(np.concatenate([model.logits(images[i : i + 1000]) for i in range(0, len(images), 1000)]), labels, t)
        print(
            f"| {name} (acc {s['accuracy']:.3f}) | {t:.3f} | {val['ece']:.4f} → {val['ece_scaled']:.4f} | "
            f"{s['ece']:.4f} → {s['ece_scaled']:.4f} | {s['nll']:.3f} → {s['nll_scaled']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
