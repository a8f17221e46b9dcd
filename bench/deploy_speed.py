"""Compressed must mean faster where it runs: a search's front timed as deployed, per runtime.

Takes an ``effray run`` output (``--run runs/demo``: its teacher, its search's report) or a
teacher and artifacts named directly, and for each ``--runtimes`` kind (``effray tune
--deploy``'s: onnx, onnx-int8, pt2, pt2-int8, openvino, openvino-int8) exports the teacher
in its best fp32 form for that runtime and every front model in that kind, each checked
against its artifact as ``effray export`` checks it, then times each model beside the
teacher in one run (:class:`effray.deploy.probe.ExportedProbe`, what a search does for
every trial): batch-1 latency (median ms), batch-N throughput (img/s), speed-ups against the
teacher on the same runtime, the parity check's top-1 agreement, and the search's accuracy.
int8 kinds on a CPU without VNNI/AMX are timed and flagged (their int8 kernels sum pairs in
int16 there). The last table names, per runtime, the fastest model within ``--within``
points of the teacher's accuracy and whether it reaches ``--goal``x at batch 1 and batch N.

    .venv/bin/python bench/deploy_speed.py --run runs/demo [--runtimes onnx,openvino,onnx-int8 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from effray.deploy.probe import prepare_probe
from effray.hardware import cpu_summary
from effray.search.deployed import DeploySpec


def front(run: Path, every: bool) -> tuple[Path, Path, float, pd.DataFrame]:
    """(teacher checkpoint, data, teacher accuracy, front rows) of an ``effray run`` output."""
    report = run / "compress" / "report"
    table = pd.read_parquet(report / "results.parquet")
    table = table if every else table[table["pareto_bytes"]]
    teacher = json.loads((run / "compress" / "teacher.json").read_text())
    data = run / "clean" / "data" if (run / "clean" / "data" / "meta.json").is_file() else run / "data"
    checkpoints = sorted((run / "teacher" / "teacher").glob("epoch-*"))  # the teacher's last epoch is the search's
    if not checkpoints:
        raise SystemExit(f"no teacher checkpoint under {run / 'teacher' / 'teacher'}: is --run an `effray run` output?")
    return checkpoints[-1], data, float(teacher["accuracy"]), table.sort_values("bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="an `effray run` output directory (teacher, search, data)")
    p.add_argument("--teacher", type=Path, default=None, help="with --artifacts and --data: instead of --run")
    p.add_argument("--artifacts", nargs="*", type=Path, default=[], help="compressed artifacts' directories to time")
    p.add_argument("--data", type=Path, default=None, help="the prepared dataset the parity checks run on")
    p.add_argument("--all-trials", action="store_true", help="every measured trial, not only the bytes front")
    p.add_argument("--runtimes", default="onnx,openvino,onnx-int8,openvino-int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=60, help="batch-1 rounds (batch N: a sixth as many)")
    p.add_argument("--within", type=float, default=1.0, help="accuracy points below the teacher's still counted")
    p.add_argument("--goal", type=float, default=2.0, help="the speed-up asked for at batch 1 and batch N")
    args = p.parse_args()
    import effray.deploy  # noqa: F401  (the probe registered, as the CLI does)

    if args.run:
        teacher, data, teacher_acc, rows = front(args.run.resolve(), args.all_trials)
        models = [(str(r["trial_id"]), Path(r["artifact"]).parent, float(r["accuracy"])) for _, r in rows.iterrows()]
    else:
        assert args.teacher and args.data and args.artifacts, "pass --run, or --teacher, --data and --artifacts"
        teacher, data, teacher_acc = args.teacher, args.data, float("nan")
        models = [(a.name, a, float("nan")) for a in args.artifacts]
    print(f"# deployed speed; {cpu_summary()}; {args.threads} thread(s), batch N = {args.batch}", flush=True)
    table, limits = [], []
    for kind in args.runtimes.split(","):
        with tempfile.TemporaryDirectory(prefix="effray-speed-") as tmp:
            probe = prepare_probe(
                DeploySpec(kind, (), args.threads, args.batch, args.repeats), str(teacher), str(data), tmp
            )
            t = probe.teacher
            note = f" ({probe.why})" if probe.why else ""
            print(f"{kind}: teacher {t['deployed_latency_ms_b1']:.3f} ms b1, {t['deployed_img_s_bN']:,.0f} img/s{note}")
            for name, artifact, acc in models:
                work = Path(tmp) / name
                shutil.copytree(artifact, work, ignore=shutil.ignore_patterns("export"))
                row = probe.measure(str(work), str(data))
                row.update(kind=kind, model=name, accuracy=acc, note=probe.why)
                table.append(row)
                print(json.dumps({k: v for k, v in row.items() if not isinstance(v, float) or v == v}), flush=True)
            probe.close()
    print(f"\n# teacher top-1 {teacher_acc:.4f}; {cpu_summary()}; {args.threads} thread(s)")
    print(f"| --deploy | model | top-1 | agreement | b1 ms | teacher b1 ms | x b1 | b{args.batch} img/s | x bN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        if "deploy_error" in r:
            print(f"| {r['kind']} | {r['model']} | {r['accuracy']:.4f} | not deployable: {r['deploy_error'][:80]} |")
            continue
        slower = " (slower)" if r["slower_than_teacher"] else ""
        print(
            f"| {r['kind']} | {r['model']}{slower} | {r['accuracy']:.4f} | {r['deploy_agreement']:.4f} | "
            f"{r['latency_ms_b1']:.3f} | {r['teacher_latency_ms_b1']:.3f} | {r['speedup_b1']:.2f}x | "
            f"{r['img_s_bN']:,.0f} | {r['speedup_bN']:.2f}x |"
        )
    for kind in dict.fromkeys(r["kind"] for r in table):
        near = [
            r
            for r in table
            if r["kind"] == kind and "deploy_error" not in r and not r["accuracy"] < teacher_acc - args.within / 100
        ]
        best = max(near, key=lambda r: min(r["speedup_b1"], r["speedup_bN"]), default=None)
        if best is None:
            limits.append(f"{kind}: no deployable model within {args.within} point(s) of the teacher")
            continue
        met = best["speedup_b1"] >= args.goal and best["speedup_bN"] >= args.goal
        limits.append(
            f"{kind}: {best['model']} ({best['accuracy']:.4f}) {best['speedup_b1']:.2f}x at b1, "
            f"{best['speedup_bN']:.2f}x at b{args.batch}: goal {args.goal}x {'met' if met else 'not met'}"
        )
    print("\n# the fastest model within", args.within, "point(s) of the teacher, per runtime")
    for line in limits:
        print("-", line)


if __name__ == "__main__":
    main()
