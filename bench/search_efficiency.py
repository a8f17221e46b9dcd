"""Search quality at equal compute: the hypervolume of the (accuracy, log bytes) front.

Every search gets the same budget of fine-tuning epochs (summed over its trials; a Tune
stopper ends the search when it is spent, trials still running included) and is scored
by the hypervolume of the front its measured trials make (accuracy 0 and the teacher's
fp32 size as the reference point). Compared, for random search and for Optuna
(multi-objective TPE over accuracy and bytes), each over ``--seeds`` seeds:

* ``pareto``: effray's multi-objective successive halving (:mod:`effray.search.scheduler`);
* ``asha``:   Ray's ASHA on accuracy alone (never stopping a trial on its last epoch);
* ``none``:   every trial runs all its epochs.

The budget is counted in epochs, not seconds, so the comparison does not depend on how
fast this machine is or what else runs on it. Also printed: a trial's fixed overhead
(worker start, set-up until its first batch, the final measurement).

    python bench/search_efficiency.py [--data DIR --teacher CKPT] [--images 5000] [--budget-epochs 32] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARQUET = ROOT.parent / "shared" / "data" / "cifar10-train.parquet"
SPACE = {
    "prune_kind": {"choice": ["unstructured", "structured"]},
    "prune_rate": {"uniform": [0.3, 0.9]},
    "bits": {"choice": [2, 4, 8]},
    "kd_alpha": {"choice": [0.0, 0.7]},
    "finetune_lr": {"loguniform": [0.003, 0.03]},
    "finetune_batch_size": 128,
    "int8": False,
}
SCHEDULERS = ("pareto", "asha", "none")


class EpochBudget:
    """Stops the whole search once its trials have reported ``epochs`` fine-tuning epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.used = epochs, 0

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not result.get("final"):
            self.used += 1
        return False

    def stop_all(self) -> bool:
        return self.used >= self.epochs


def _stopper(epochs: int) -> Any:
    from ray.tune.stopper import Stopper

    class Budget(EpochBudget, Stopper):
        pass

    return Budget(epochs)


def prepare_data(out: Path, images: int) -> Path:
    from effray.data.prepare import PrepareConfig, prepare

    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare(PrepareConfig(source=str(PARQUET), out=str(data), limit=images, val_fraction=0.2))
    return data


def train_teacher(data: Path, out: Path, epochs: int) -> Path:
    """A convnet (width 0.5) trained in this process on the shared arrays: the same teacher
    for every search."""
    from effray.data.arrays import load_arrays
    from effray.data.prepare import load_meta
    from effray.train.checkpoint import save_payload
    from effray.train.local import fit_arrays, fitted_payload

    path = out / "teacher"
    if (path / "model.pt").is_file():
        return path
    meta = load_meta(data)
    model = fit_arrays(load_arrays(data, "train"), meta, epochs=epochs)
    save_payload(path, fitted_payload(model, meta, epochs))
    return path


def run_one(
    args: argparse.Namespace, data: Path, teacher: Path, search: str, scheduler: str, seed: int
) -> dict[str, Any]:
    import shutil

    from effray.errors import EffrayError
    from effray.search.aggregate import ReportConfig, report
    from effray.search.config import TuneConfig
    from effray.search.driver import tune_compression
    from effray.search.results import load_stopped

    name = f"{search}-{scheduler}-s{seed}"
    shutil.rmtree(args.out / "runs" / name, ignore_errors=True)  # a fresh search, not a resumed one
    cfg = TuneConfig(
        teacher=str(teacher),
        data=str(data),
        space=str(args.out / "space.yaml"),
        num_samples=args.max_trials,
        search="optuna" if search == "optuna" else "random",
        multi_objective=search == "optuna",
        scheduler=scheduler,
        seed=seed,
        storage=str(args.out / "runs"),
        name=name,
        wandb=False,
    )
    stopper = _stopper(args.budget_epochs)
    t = time.perf_counter()
    summary = tune_compression(cfg, stop=stopper)
    wall = time.perf_counter() - t
    try:
        rep = report(ReportConfig(experiment=summary["experiment"]))
    except EffrayError:  # no trial measured within the budget
        rep = {"hypervolume": 0.0, "pareto": {"bytes": 0}, "trials": 0}
    import pandas as pd

    table = pd.read_parquet(Path(rep["report"]).with_name("results.parquet")) if rep.get("report") else pd.DataFrame()
    overhead = {}
    if len(table):
        overhead = {k: float(table[k].median()) for k in ("worker_start_s", "setup_s") if k in table}
        overhead["measure_s"] = float((table["trial_s"] - table["setup_s"] - table["finetune_s"]).median())
    return {
        "search": search,
        "scheduler": scheduler,
        "seed": seed,
        "hypervolume": rep["hypervolume"] or 0.0,
        "front": rep["pareto"].get("bytes", 0),
        "measured": rep["trials"],
        "started": summary["trials"],
        "stopped": int(len(load_stopped(summary["experiment"]))),
        "epochs": stopper.used,
        "wall_s": wall,
        **overhead,
    }


def teacher_arguments(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the flags of :func:`prepare_data` and :func:`train_teacher` (or their
    results, to reuse): the benches that start from a trained teacher share them."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="a prepared dataset (default: --images rows of the shared CIFAR-10 file)")
    p.add_argument("--teacher", default="", help="a checkpoint trained on --data (default: trained here)")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--teacher-epochs", type=int, default=8)
    return p


def data_and_teacher(args: argparse.Namespace) -> tuple[Path, Any]:
    """Print the CPU line, then ``(data dir, teacher model)`` from :func:`teacher_arguments`'
    flags: the given ones, or prepared and trained here (Ray Data prepares)."""
    import os

    from effray.cluster import init_ray
    from effray.hardware import cpu_summary
    from effray.train.checkpoint import load_checkpoint

    print(f"{cpu_summary()}, {os.cpu_count()} cores", flush=True)
    if not args.data:
        init_ray(log_to_driver=False)
    data = Path(args.data) if args.data else prepare_data(args.out, args.images)
    teacher, _ = load_checkpoint(args.teacher or train_teacher(data, args.out, args.teacher_epochs))
    return data, teacher


def main() -> int:
    p = teacher_arguments(__doc__)
    p.add_argument("--epochs-per-trial", type=int, default=4)
    p.add_argument("--budget-epochs", type=int, default=32, help="fine-tuning epochs per search, over all its trials")
    p.add_argument("--max-trials", type=int, default=64, help="a cap the budget should end before")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--searches", default="random,optuna")
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-search")
    p.add_argument("--fresh", action="store_true", help="forget the searches a previous run of this budget finished")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    import os

    from effray.cluster import init_ray
    from effray.hardware import cpu_summary

    init_ray(log_to_driver=False)
    print(f"{cpu_summary()}, {os.cpu_count()} cores", flush=True)
    (args.out / "space.yaml").write_text(yaml.safe_dump({**SPACE, "finetune_epochs": args.epochs_per_trial}))
    data = Path(args.data) if args.data else prepare_data(args.out, args.images)
    teacher = Path(args.teacher) if args.teacher else train_teacher(data, args.out, args.teacher_epochs)
    # one line per finished search; a re-run with the same budget skips those (--fresh starts over)
    done_file = args.out / f"results-budget{args.budget_epochs}-e{args.epochs_per_trial}.jsonl"
    if args.fresh:
        done_file.unlink(missing_ok=True)
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    for search in args.searches.split(","):
        for seed in range(args.seeds):
            for scheduler in args.schedulers.split(","):
                if any((r["search"], r["scheduler"], r["seed"]) == (search, scheduler, seed) for r in rows):
                    continue
                row = run_one(args, data, teacher, search, scheduler, seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(done_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table([r for r in rows if r["search"] in args.searches.split(",") and r["seed"] < args.seeds], args)
    return 0


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nbudget {args.budget_epochs} fine-tuning epochs per search ({args.epochs_per_trial} per trial), "
        f"{args.seeds} seeds; hypervolume of (accuracy, ln bytes) from accuracy 0 and the teacher's size"
    )
    print(
        f"{'search':<8}{'scheduler':<10}{'HV mean':>9}{'HV sd':>8}"
        f"{'front':>7}{'measured':>9}{'stopped':>8}{'started':>8}"
    )
    means: dict[tuple[str, str], float] = {}
    for search in dict.fromkeys(r["search"] for r in rows):
        for scheduler in dict.fromkeys(r["scheduler"] for r in rows):
            group = [r for r in rows if r["search"] == search and r["scheduler"] == scheduler]
            if not group:
                continue
            hv = [r["hypervolume"] for r in group]
            means[search, scheduler] = statistics.mean(hv)
            sd = statistics.stdev(hv) if len(hv) > 1 else 0.0
            avg = {k: statistics.mean(r[k] for r in group) for k in ("front", "measured", "stopped", "started")}
            print(
                f"{search:<8}{scheduler:<10}{means[search, scheduler]:>9.4f}{sd:>8.4f}{avg['front']:>7.1f}"
                f"{avg['measured']:>9.1f}{avg['stopped']:>8.1f}{avg['started']:>8.1f}"
            )
    ours = [v for (_, s), v in means.items() if s == "pareto"]
    others = [v for (_, s), v in means.items() if s != "pareto"]
    if ours and others:
        print(f"effray's best / best other: {max(ours) / max(others):.3f}")
        for search in dict.fromkeys(r["search"] for r in rows):
            rest = [v for (q, s), v in means.items() if q == search and s != "pareto"]
            if (search, "pareto") in means and rest:
                print(f"  {search}: pareto / best other {means[search, 'pareto'] / max(rest):.3f}")
    overhead = {
        k: statistics.median(r[k] for r in rows if k in r)
        for k in ("worker_start_s", "setup_s", "measure_s")
        if any(k in r for r in rows)
    }
    if overhead:
        print("trial overhead (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in overhead.items()))


if __name__ == "__main__":
    sys.exit(main())
