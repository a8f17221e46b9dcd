"""How close the search's bytes prediction comes to the artifact a real fine-tune saves.

The search drops configs over a size budget and ranks trials at every rung by the bytes
:func:`effray.compress.cost.predict_costs` predicts before a trial runs (parameters and
MACs are exact by construction; bytes depend on what fine-tuning leaves in the weights,
since LZMA's ratio on the k-bit codes does). Here, from one teacher, every config of a
grid (prune kind x bits x peak LR) is predicted, then fine-tuned for real on
``--seeds`` data orders and saved by the recipe's own path. Printed per config: the
prediction, the measured sizes, the error against their mean, and the spread between
the seeds themselves (the floor no prediction made before training can beat).

    python bench/cost_prediction.py [--data DIR --teacher CKPT] [--images 5000] [--seeds 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from search_efficiency import data_and_teacher, teacher_arguments

ROOT = Path(__file__).resolve().parents[1]


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds, bits, lrs = (
        args.kinds.split(","),
        [int(b) for b in args.bits.split(",")],
        [float(x) for x in args.lrs.split(",")],
    )
    return [
        {
            "prune_kind": k,
            "prune_rate": args.rate,
            "bits": b,
            "finetune_lr": lr,
            "kd_alpha": 0.7,
            "finetune_epochs": args.epochs,
            "finetune_batch_size": 128,
            "calib_batches": 2,
            "int8": False,
        }
        for k, b, lr in itertools.product(kinds, bits, lrs)
    ]


def measure_one(teacher: Any, fields: dict[str, Any], data: Path, seeds: int) -> dict[str, Any]:
    """The prediction, then the real fine-tunes (one per data order) and their artifacts."""
    import torch

    from effray.compress.config import CompressConfig
    from effray.compress.cost import predict_costs
    from effray.compress.recipe import compress_local
    from effray.config import validated
    from effray.data.arrays import epoch_batches, eval_batches, load_arrays
    from effray.data.prepare import load_meta

    cfg = validated(CompressConfig(**fields))
    meta = load_meta(data)
    train, val = load_arrays(data, "train"), load_arrays(data, "val")
    evals = eval_batches(val, meta, 256)
    calib = eval_batches({k: v[: 256 * cfg.calib_batches] for k, v in train.items()}, meta, 256)
    started = time.perf_counter()
    predicted = predict_costs(teacher, cfg)
    predict_s = time.perf_counter() - started
    sizes, accs = [], []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(seed)
            result = compress_local(
                teacher,
                cfg,
                lambda epoch, s=seed: epoch_batches(
                    train, meta, cfg.finetune_batch_size, policy="standard", seed=s, epoch=epoch, device="cpu"
                ),
                calib,
                evals,
                tmp,
                log=lambda line: None,
            )
        sizes.append(result["student"]["bytes"])
        accs.append(result["student"]["accuracy"])
        assert result["student"]["params"] == predicted["params"] and result["student"]["macs"] == predicted["macs"]
    mean = statistics.fmean(sizes)
    return {
        **fields,
        "predicted": predicted["bytes"],
        "measured": sizes,
        "accuracy": accs,
        "predict_s": predict_s,
        "error_pct": 100 * (predicted["bytes"] - mean) / mean,
        "seed_spread_pct": 100 * (max(sizes) - min(sizes)) / mean,
    }


def main() -> int:
    p = teacher_arguments(__doc__)
    p.add_argument("--kinds", default="unstructured,structured")
    p.add_argument("--bits", default="2,4,8")
    p.add_argument("--lrs", default="0.01,0.03", help="peak fine-tuning LRs (the 8-bit codes' size depends on it)")
    p.add_argument("--rate", type=float, default=0.55)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per config")
    p.add_argument("--seeds", type=int, default=2, help="data orders each config is fine-tuned on")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cost")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data, teacher = data_and_teacher(args)
    rows = []
    print(
        f"{'kind':<13}{'bits':>5}{'lr':>7}{'predicted':>11}{'measured':>20}"
        f"{'error':>8}{'seeds':>8}{'acc':>7}{'pred s':>8}"
    )
    for fields in grid(args):
        row = measure_one(teacher, fields, data, args.seeds)
        rows.append(row)
        print(
            f"{row['prune_kind']:<13}{row['bits']:>5}{row['finetune_lr']:>7.3g}{row['predicted']:>11,}"
            f"{' / '.join(f'{b:,}' for b in row['measured']):>20}"
            f"{row['error_pct']:>+7.1f}%{row['seed_spread_pct']:>7.1f}%"
            f"{statistics.fmean(row['accuracy']):>7.3f}{row['predict_s']:>8.2f}",
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    within = sum(abs(r["error_pct"]) <= 2 for r in rows)
    print(
        f"{within}/{len(rows)} configs within 2 %; worst {worst['error_pct']:+.1f}% "
        f"({worst['prune_kind']} {worst['bits']}-bit lr {worst['finetune_lr']:g}); "
        f"largest seed-to-seed spread {max(r['seed_spread_pct'] for r in rows):.1f}%",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
