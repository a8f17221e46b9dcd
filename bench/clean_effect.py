"""Does cleaning help? The same model trained on the raw and on the cleaned train split.

Takes a prepared dataset (``--data``) and an ``effray data clean`` output for it
(``--clean``: its ``removed.parquet``). For each variant of the train split

* ``raw``: every row;
* ``- duplicates, leaks``: less the rows the cleaner flags as exact/near duplicates of an
  earlier train row or as copies of a val/test/reference image;
* ``- duplicates, leaks, labels``: also less the rows cleanlab flags as label issues,

it trains the same model (:func:`effray.train.local.fit_arrays`: same seed, epochs,
schedule and augmentation; in this process, ``--threads`` threads) and scores it on the
held-out val split, which cleaning never touches. ``--seeds`` repeats every variant with
other seeds, so the spread between seeds of one variant can be read beside the
difference between variants. The normalisation is the raw train split's for all of them
(the cleaned dataset's own differs in the fourth decimal).

    python bench/clean_effect.py --data runs/full50k --clean runs/clean50k [--epochs 10 --seeds 0,1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from effray.clean.config import ROW_REASONS
from effray.clean.labels import predict_probs
from effray.data.arrays import load_arrays
from effray.data.prepare import load_meta
from effray.hardware import cpu_summary
from effray.train.local import fit_arrays

VARIANTS = {
    "raw": (),
    "- duplicates, leaks": ("duplicates", "leaks"),
    "- duplicates, leaks, labels": ("duplicates", "leaks", "labels"),
}


def flagged_train_rows(removed: Path, reasons: tuple[str, ...]) -> set[int]:
    """Train-split ``index`` values that ``removed.parquet`` flags for any of ``reasons``."""
    table = pq.read_table(removed, columns=["split", "index", "reason"]).to_pydict()
    return {
        i
        for s, i, r in zip(table["split"], table["index"], table["reason"], strict=True)
        if s == "train" and ROW_REASONS.get(r) in reasons
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset that was cleaned")
    p.add_argument("--clean", type=Path, required=True, help="the `effray data clean --out` directory")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    meta = load_meta(args.data)
    train, val = load_arrays(args.data, "train"), load_arrays(args.data, "val")
    seeds = [int(s) for s in args.seeds.split(",")]
    cpu = f"{cpu_summary()}, {args.threads} threads"
    print(
        f"# {args.model} x{args.width}, {args.epochs} epochs, batch {args.batch_size}, standard augmentation; "
        f"val: {len(val['label'])} held-out images; {cpu}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for name, reasons in VARIANTS.items():
        drop = flagged_train_rows(args.clean / "removed.parquet", reasons) if reasons else set()
        keep = ~np.isin(train["index"], np.fromiter(drop, np.int64, len(drop)))
        subset = {k: v[keep] for k, v in train.items()}
        accs = []
        for seed in seeds:
            t = time.perf_counter()
            model = fit_arrays(
                subset,
                meta,
                epochs=args.epochs,
                model=args.model,
                width=args.width,
                batch_size=args.batch_size,
                seed=seed,
            )
            _, acc = predict_probs(model, val, meta)
            accs.append(acc)
            print(
                f"{name}: {int(keep.sum())} train rows, seed {seed}: val accuracy {acc:.4f} "
                f"({time.perf_counter() - t:.0f} s; {cpu})",
                flush=True,
            )
        rows.append({"variant": name, "rows": int(keep.sum()), "removed": len(drop), "accs": accs})
    raw = float(np.mean(rows[0]["accs"]))
    print("\n| train split | rows | removed | val accuracy (per seed) | mean | vs raw |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mean = float(np.mean(r["accs"]))
        per = " / ".join(f"{a:.2%}" for a in r["accs"])
        row = f"| {r['variant']} | {r['rows']:,} | {r['removed']:,} | {per} | {mean:.2%} | {100 * (mean - raw):+.2f} |"
        print(row.replace("%", " %"))
    if len(seeds) > 1:
        spread = max(float(np.ptp(r["accs"])) for r in rows)
        print(f"\nlargest spread between seeds of one variant: {100 * spread:.2f} points")


if __name__ == "__main__":
    main()
