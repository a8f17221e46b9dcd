"""Sensitivity allocation against uniform compression at equal bytes, on real CIFAR-10.

For each teacher and each budget point (a uniform config: ``bits:rate``, unstructured, or
``bits:sRATE``, structured), the uniform config and its sensitivity allocation (per-layer
bits and rates from ``effray sensitivity``, at most the uniform file's bytes; per-layer
channel rates at most the uniform model's MACs when structured, then bits per layer of the
cut model within the uniform file's bytes) are fine-tuned the same way
(QAT + logit KD, the same seed, images and epochs) and their saved artifacts measured.
Printed: each pair's accuracy and bytes, the hypervolume of the two fronts (accuracy vs
ln bytes up to the teacher's fp32 size) and their ratio, and the wall-clock of the
sensitivity pass on one and on two Ray tasks at a time. CPU capability first.

A peer beside them (``--nncf``, needs ``pip install -e '.[peers]'``): NNCF quantizing the
same teacher, converted to OpenVINO, with its int8 post-training quantization (calibrated
on the train images the fine-tunes use) and its accuracy-controlled quantization
(``quantize_with_accuracy_control`` at ``--nncf-max-drop`` points), each scored on the
same val split and sized as OpenVINO saves it (.xml + .bin), and whether an effray
config is at least as accurate in no more bytes.

    python bench/allocation.py --teacher CKPT --data DIR [--teacher CKPT2 --data DIR2]
        [--budgets 2:0.5,4:0.5,4:0.75] [--finetune-images 5000] [--epochs 1] [--nncf]

The selection-vs-test gap: every config is scored on the split it is chosen on (val; the
first half of val when the dataset has no test split) and on data nothing was chosen on
(the test split, or val's second half). Printed per budget and overall: the config most
accurate on the selection split, its accuracy on both and the gap, beside the teacher's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def sensitivity_pass(
    teacher: str, data: str, out: Path, concurrent: int, probe_images: int, bits: str, rates: str, kinds: str
) -> tuple[str, float]:
    """(parquet path, wall seconds) of a fresh pass with ``concurrent`` probe tasks at a time
    (each task then takes ``cores / concurrent`` threads)."""
    from effray.compress.sensitivity import SensitivityConfig
    from effray.compress.sensitivity_run import sensitivity

    shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    cfg = SensitivityConfig(
        teacher=teacher,
        data=data,
        out=str(out),
        kinds=kinds,
        bits=bits,
        rates=rates,
        calib_images=probe_images,
        cpus_per_task=max(1.0, cores / concurrent),
    )
    started = time.perf_counter()
    done = sensitivity(cfg)
    return done["parquet"], time.perf_counter() - started


def selection_and_held_out(data: Path) -> tuple[Any, Any, str]:
    """(selection rows, held-out rows, what the held-out rows are): val and the test split, or
    val's two halves when the dataset has no test split."""
    from effray.data.arrays import load_arrays
    from effray.data.prepare import load_meta

    val = load_arrays(data, "val")
    if load_meta(data)["counts"].get("test"):
        return val, load_arrays(data, "test"), "the test split"
    half = len(val["label"]) // 2
    return {k: v[:half] for k, v in val.items()}, {k: v[half:] for k, v in val.items()}, "val's second half"


def fine_tune(teacher: Any, cfg: Any, data: Path, images: int, seed: int) -> dict[str, Any]:
    """The recipe in this process on the first ``images`` train rows; the saved artifact's
    metrics on the selection split, and its accuracy on the held-out rows (``held_out``)."""
    import torch

    from effray.compress.artifact import load_artifact
    from effray.compress.measure import scored
    from effray.compress.recipe import compress_local
    from effray.data.arrays import epoch_batches, eval_batches, load_arrays
    from effray.data.prepare import load_meta

    meta = load_meta(data)
    train = load_arrays(data, "train", limit=images)
    selection, held, _ = selection_and_held_out(data)
    evals = eval_batches(selection, meta, 256)
    calib = eval_batches({k: v[: 256 * cfg.calib_batches] for k, v in train.items()}, meta, 256)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        result = compress_local(
            teacher,
            cfg,
            lambda epoch: epoch_batches(
                train, meta, cfg.finetune_batch_size, policy="standard", seed=seed, epoch=epoch, device="cpu"
            ),
            calib,
            evals,
            tmp,
            log=lambda line: None,
        )
        held_out = scored(load_artifact(tmp)[0], eval_batches(held, meta, 256))["accuracy"]
    return {**result["student"], "held_out": held_out, "teacher": result["teacher"]}


def nncf_peer(teacher: Any, data: Path, calib_images: int, max_drop_points: float) -> list[dict[str, Any]]:
    """NNCF's int8 PTQ and accuracy-controlled quantization of ``teacher`` on OpenVINO:
    accuracy on the val split and the saved model's bytes, one row each."""
    import nncf
    import openvino as ov

    from effray.data.arrays import eval_batches, load_arrays
    from effray.data.prepare import load_meta

    meta = load_meta(data)
    val = eval_batches(load_arrays(data, "val"), meta, 250)
    calib = eval_batches(load_arrays(data, "train", limit=calib_images), meta, 64)
    fp32 = ov.convert_model(teacher.eval(), example_input=val[0][0][:1])

    def validate(model: Any, items: Any) -> tuple[float, None]:
        compiled = model if isinstance(model, ov.CompiledModel) else ov.compile_model(model, "CPU")
        out, correct, seen = compiled.outputs[0], 0, 0
        for x, y in items:
            correct += int((compiled(x.numpy())[out].argmax(1) == y.numpy()).sum())
            seen += len(y)
        return correct / seen, None

    calibration = nncf.Dataset(calib, lambda item: item[0].numpy())
    started = time.perf_counter()
    ptq = nncf.quantize(fp32, calibration, subset_size=len(calib))
    ptq_s = time.perf_counter() - started
    started = time.perf_counter()
    controlled = nncf.quantize_with_accuracy_control(
        fp32,
        calibration,
        nncf.Dataset(val, lambda item: item[0].numpy()),
        validate,
        max_drop=max_drop_points / 100,
        subset_size=len(calib),
    )
    controlled_s = time.perf_counter() - started
    rows = []
    for name, model, seconds in (
        ("nncf int8 ptq", ptq, ptq_s),
        (f"nncf int8 max_drop {max_drop_points:g}", controlled, controlled_s),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            nbytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        rows.append({"peer": name, "accuracy": validate(model, val)[0], "bytes": nbytes, "seconds": seconds})
    return rows


def selection_gaps(teacher: Any, data: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pick of each budget and of all budgets (most accurate on the selection split), its
    accuracy there and on the held-out rows, printed beside the teacher's; one row each."""
    from effray.compress.measure import scored
    from effray.data.arrays import eval_batches
    from effray.data.prepare import load_meta

    meta = load_meta(data)
    selection, held, held_name = selection_and_held_out(data)
    teacher_sel = scored(teacher, eval_batches(selection, meta, 256))["accuracy"]
    teacher_held = scored(teacher, eval_batches(held, meta, 256))["accuracy"]
    print(
        f"selection vs held-out ({held_name}, {len(held['label']):,} rows; selection {len(selection['label']):,}): "
        f"teacher {teacher_sel:.4f} -> {teacher_held:.4f} ({(teacher_held - teacher_sel) * 100:+.2f} pt)",
        flush=True,
    )
    groups = {r["budget"]: [x for x in rows if x["budget"] == r["budget"]] for r in rows}
    out = []
    for label, group in [*groups.items(), ("all budgets", rows)]:
        pick = max(group, key=lambda r: r["accuracy"])
        gap = (pick["held_out"] - pick["accuracy"]) * 100
        out.append({"among": label, "pick": f"{pick['budget']} {pick['allocation']}", "gap_points": gap})
        print(
            f"  pick among {label:>11}: {pick['budget']} {pick['allocation']:<11} {pick['accuracy']:.4f} -> "
            f"{pick['held_out']:.4f} ({gap:+.2f} pt)",
            flush=True,
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append", required=True, help="a teacher checkpoint (repeat for several)")
    p.add_argument("--data", action="append", required=True, help="its prepared dataset (one per --teacher)")
    p.add_argument(
        "--budgets",
        default="2:0.5,4:0.5,4:0.75",
        help="uniform configs bits:rate (bits:sRATE = structured), one budget each",
    )
    p.add_argument("--finetune-images", type=int, default=5000, help="train rows each config fine-tunes on")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--probe-bits", default="2,3,4,6,8", help="bit widths each layer is probed at")
    p.add_argument("--probe-rates", default="0.25,0.5,0.6,0.75", help="unstructured rates each layer is probed at")
    p.add_argument("--probe-images", type=int, default=512, help="val images each sensitivity probe is scored on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nncf", action="store_true", help="place NNCF's int8 quantization of each teacher beside them")
    p.add_argument("--nncf-max-drop", type=float, default=1.0, help="points NNCF's accuracy control may lose")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-allocation")
    args = p.parse_args()
    if len(args.teacher) != len(args.data):
        p.error("give one --data per --teacher")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from effray.cluster import init_ray
    from effray.compress.allocate import allocated
    from effray.compress.config import CompressConfig
    from effray.config import validated
    from effray.hardware import cpu_summary
    from effray.search.fronts import hypervolume
    from effray.train.checkpoint import load_checkpoint

    print(f"{cpu_summary()}, {os.cpu_count()} cores", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    init_ray(log_to_driver=False)
    budgets = [
        (int(b), float(r.lstrip("s")), r.startswith("s")) for b, r in (i.split(":") for i in args.budgets.split(","))
    ]
    kinds = "unstructured" + (",structured" if any(structured for *_, structured in budgets) else "")
    report: list[dict[str, Any]] = []
    for t, (teacher_path, data) in enumerate(zip(args.teacher, args.data)):
        teacher, _ = load_checkpoint(teacher_path)
        passes = {
            n: sensitivity_pass(
                teacher_path,
                data,
                args.out / f"sens-{t}-{n}",
                n,
                args.probe_images,
                args.probe_bits,
                args.probe_rates,
                kinds,
            )
            for n in (1, 2)
        }
        table = passes[2][0]
        print(
            f"\nteacher {teacher_path} ({teacher.spec['name']}): sensitivity pass {passes[1][1]:.1f} s on 1 task at a "
            f"time, {passes[2][1]:.1f} s on 2 ({passes[1][1] / passes[2][1]:.2f}x)",
            flush=True,
        )
        print(
            f"{'budget':>10} {'allocation':>12} {'accuracy':>9} {'held-out':>9} {'bytes':>9} {'MACs':>11} "
            f"{'bits and channel rates per layer':<40}",
            flush=True,
        )
        rows = []
        for bits, rate, structured in budgets:
            uniform = validated(
                CompressConfig(
                    bits=bits,
                    prune_rate=rate,
                    prune_kind="structured" if structured else "unstructured",
                    kd_alpha=0.7,
                    finetune_epochs=args.epochs,
                    finetune_lr=args.lr,
                    finetune_batch_size=128,
                    calib_batches=2,
                    int8=False,
                )
            )
            chosen = allocated(teacher, dataclasses.replace(uniform, allocation="sensitivity", sensitivity=table))
            for kind, cfg in (("uniform", uniform), ("sensitivity", chosen)):
                m = fine_tune(teacher, cfg, Path(data), args.finetune_images, args.seed)
                label = f"{bits}:{'s' if structured else ''}{rate:g}"
                row = {"teacher": teacher_path, "budget": label, "allocation": kind, "structured": structured, **m}
                row["layer_bits"], row["layer_rates"] = cfg.layer_bits, cfg.layer_rates
                rows.append(row)
                shown = (
                    " ".join(
                        f"{what} {','.join(v.split('=')[1] for v in spec.split(','))}"
                        for what, spec in (
                            ("bits", cfg.layer_bits),
                            ("channels", cfg.layer_rates if structured else ""),
                        )
                        if spec
                    )
                    or "uniform"
                )
                print(
                    f"{row['budget']:>10} {kind:>12} {m['accuracy']:>9.4f} {m['held_out']:>9.4f} {m['bytes']:>9,} "
                    f"{m['macs']:>11,} {shown:<40}",
                    flush=True,
                )
        hv = {}
        for structured, cost in ((False, "bytes"), (True, "macs")):  # bytes for bits and zeros, MACs for channels
            group = [r for r in rows if r["structured"] == structured]
            if not group:
                continue
            ref = rows[0]["teacher"][cost]
            hv[cost] = {
                kind: hypervolume(
                    [r["accuracy"] for r in group if r["allocation"] == kind],
                    [r[cost] for r in group if r["allocation"] == kind],
                    ref,
                )
                for kind in ("uniform", "sensitivity")
            }
            print(
                f"hypervolume (accuracy x ln {cost}, to the teacher's {ref:,}) of the "
                f"{'structured' if structured else 'unstructured'} budgets: uniform {hv[cost]['uniform']:.4f}, "
                f"sensitivity {hv[cost]['sensitivity']:.4f}, "
                f"ratio {hv[cost]['sensitivity'] / max(hv[cost]['uniform'], 1e-12):.3f} (goal >= 1.05)",
                flush=True,
            )
        print(f"teacher accuracy {rows[0]['teacher']['accuracy']:.4f}", flush=True)
        gaps = selection_gaps(teacher, Path(data), rows)
        peers = nncf_peer(teacher, Path(data), args.finetune_images, args.nncf_max_drop) if args.nncf else []
        for peer in peers:
            beaten = [
                f"{r['budget']} {r['allocation']}"
                for r in rows
                if r["accuracy"] >= peer["accuracy"] and r["bytes"] <= peer["bytes"]
            ]
            print(
                f"{peer['peer']:>23} {peer['accuracy']:>9.4f} {peer['bytes']:>9,}  "
                f"({peer['seconds']:.0f} s; at least as accurate in no more bytes: {', '.join(beaten) or 'none'})",
                flush=True,
            )
        report.append(
            {
                "teacher": teacher_path,
                "rows": rows,
                "hypervolume": hv,
                "pass_s": {n: s for n, (_, s) in passes.items()},
                "peers": peers,
                "selection_gaps": gaps,
            }
        )
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
