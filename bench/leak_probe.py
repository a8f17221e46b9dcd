"""How many of ciFAIR's human-checked CIFAR-10 leaks does `effray data clean` find?

``cifar10-leak-probe.parquet`` (see ``../shared/data/README.md``) holds 143 test images
that Barz & Denzler (ciFAIR, 2020) found a near duplicate of in the training set, each with
its training partner's original index, and 1,000 test images they list in no pair. This
prepares the 50,000 training images and the probe (once, into ``--work``), runs the real
``effray data clean --reference probe --no-labels`` once per ``--embedders`` entry, and
scores each run's output the same way:

- a probe image is *flagged* when some training row is a leak of it (``removed.parquet``);
  it is *found* when one of those rows is its listed partner. Recall = found / 143;
  precision = found / flagged (a flagged negative, or a positive flagged with the wrong
  training row only, counts against it), at the run's own, label-free, operating point;
- recall at K: of ``candidates.parquet``'s train-probe pairs, best first, the share of the
  143 whose partner pair is among the first K (what a person reviewing K pairs finds);
- the best recall at precision >= 0.7 over every threshold on that list (an oracle: the
  labels pick the threshold), and precision / recall at a few thresholds: the curve;
- the run's phase times, beside the CPU capability.

``--score DIR`` scores an existing clean output instead (e.g. one made by an earlier
effray, which wrote no candidates: its recall at K is left out).

    python bench/leak_probe.py [--embedders pixels,classifier] [--work DIR] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from effray.clean.config import CleanConfig
from effray.clean.run import clean
from effray.cluster import init_ray
from effray.data.prepare import PrepareConfig, prepare, split_files
from effray.hardware import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
KS = (100, 300, 1000)
GOAL = 0.7


def names(data: str, split: str) -> dict[int, str]:
    """A prepared split's ``index`` -> its source ``name``."""
    out: dict[int, str] = {}
    for f in split_files(data, split):
        t = pq.read_table(f, columns=["index", "name"])
        out.update(zip(t.column("index").to_pylist(), t.column("name").to_pylist()))
    return out


def original(name: str) -> int:
    """``train/<class>/<NNNNN>.png`` -> NNNNN."""
    return int(name.rsplit("/", 1)[-1].split(".")[0])


def truth(probe_parquet: str, probe_dir: str) -> dict[str, Any]:
    """Per prepared probe row (its ``index``): the partner's original train index (-1 for a
    negative) and ciFAIR's judgment."""
    t = pq.read_table(probe_parquet, columns=["name", "train_partners", "cifair_judgment"])
    by_name = {
        n: (p[0] if p else -1, j)
        for n, p, j in zip(
            t.column("name").to_pylist(),
            t.column("train_partners").to_pylist(),
            t.column("cifair_judgment").to_pylist(),
        )
    }
    rows = names(probe_dir, "train")
    return {i: by_name[n] for i, n in rows.items()}


def score(out: str, train_names: dict[int, str], probe: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """The figures of one clean output directory against the probe."""
    positives = {i for i, (p, _) in probe.items() if p >= 0}
    removed = pq.read_table(Path(out) / "removed.parquet").to_pylist()
    flagged: dict[int, set[int]] = {}
    for r in removed:
        if r["reason"] == "leak" and r["duplicate_of_split"] == "reference":
            flagged.setdefault(int(r["duplicate_of_index"]), set()).add(original(train_names[int(r["index"])]))
    found = {q for q, rows in flagged.items() if probe[q][0] in rows}
    res: dict[str, Any] = {
        "flagged": len(flagged),
        "found": len(found),
        "recall": len(found) / len(positives),
        "precision": len(found) / len(flagged) if flagged else float("nan"),
        "recall_by_judgment": {
            j: round(len({q for q in found if probe[q][1] == j}) / max(1, sum(probe[q][1] == j for q in positives)), 3)
            for j in (1, 2)
        },
    }
    report = json.loads((Path(out) / "clean_report.json").read_text())
    res["phase_seconds"] = report.get("phase_seconds", {})
    res["threshold"] = (report.get("near") or {}).get("threshold")
    res["expected_precision"] = (report.get("near") or {}).get("leak_precision_at_least")
    cand_file = Path(out) / "candidates.parquet"
    if cand_file.is_file():
        c = pq.read_table(cand_file).to_pylist()
        pairs = [r for r in c if r["kind"] == "leak" and r["match_split"] == "reference"]
        hits = [probe[r["match_index"]][0] == original(train_names[r["index"]]) for r in pairs]
        res.update(ranked(pairs, hits, positives))
    return res


def ranked(pairs: list[dict[str, Any]], hits: list[bool], positives: set[int]) -> dict[str, Any]:
    """Recall at K pairs, the oracle recall at precision >= GOAL, and the curve, from the
    ranked train-probe pairs (best first) and whether each is a listed partner pair."""
    seen_flag: set[int] = set()
    seen_hit: set[int] = set()
    curve = []
    for r, hit in zip(pairs, hits):
        seen_flag.add(r["match_index"])
        if hit:
            seen_hit.add(r["match_index"])
        curve.append((r["score"], len(seen_hit) / len(positives), len(seen_hit) / len(seen_flag)))
    at_k = {k: curve[min(k, len(curve)) - 1][1] if curve else 0.0 for k in KS}
    ok = [rec for _, rec, prec in curve if prec >= GOAL]
    points = []
    for t in (1.5, 2.0, 2.5, 3.0, 4.0, 6.0):
        above = [(rec, prec) for s, rec, prec in curve if s >= t]
        if above:
            points.append({"score": t, "recall": round(above[-1][0], 3), "precision": round(above[-1][1], 3)})
    return {"recall_at": at_k, "oracle_recall_at_precision_0.7": max(ok) if ok else 0.0, "curve": points}


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of every run."""
    head = (
        "| embedder | threshold | flagged | recall | precision | expected precision (≥) | "
        + " | ".join(f"recall@{k}" for k in KS)
        + " | oracle recall @ p≥0.7 | embed s | kNN s | train s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        ph = r["phase_seconds"]
        at = r.get("recall_at", {})
        lines.append(
            f"| {name} | {r['threshold'] if r['threshold'] is not None else float('nan'):.3f} | {r['flagged']} | "
            f"{r['recall']:.3f} | {r['precision']:.3f} | {r['expected_precision'] or float('nan'):.3f} | "
            + " | ".join(f"{at[k]:.3f}" if k in at else "—" for k in KS)
            + f" | {r.get('oracle_recall_at_precision_0.7', float('nan')):.3f} | {ph.get('embed', 0):.0f} | "
            f"{ph.get('knn', 0):.0f} | {ph.get('fold_models', 0):.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(SHARED / "cifar10-train.parquet"))
    p.add_argument("--probe", default=str(SHARED / "cifar10-leak-probe.parquet"))
    p.add_argument("--work", default="runs/leak-probe", help="prepared datasets and clean outputs (kept, reused)")
    p.add_argument("--embedders", default="pixels", help="comma-separated --embedder values to run")
    p.add_argument("--checkpoint", default="", help="the classifier embedder's model (default: trained by the run)")
    p.add_argument("--epochs", type=int, default=12, help="the classifier's epochs when it is trained here")
    p.add_argument("--score", default="", help="score this existing clean output directory only")
    p.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (0: all)")
    p.add_argument("--candidates", type=int, default=5000, help="--candidates of each run")
    args = p.parse_args()

    print(f"{cpu_summary()}, {os.cpu_count()} cores", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=args.cpus or None)
    data, probe_dir = str(work / "train50k"), str(work / "probe")
    started = time.time()
    if not (Path(data) / "meta.json").is_file():
        prepare(PrepareConfig(source=f"parquet:{args.train}", out=data, val_fraction=0.0, test_fraction=0.0))
    if not (Path(probe_dir) / "meta.json").is_file():
        prepare(PrepareConfig(source=f"parquet:{args.probe}", out=probe_dir, val_fraction=0.0, test_fraction=0.0))
    print(f"prepared in {time.time() - started:.0f} s", flush=True)
    train_names, probe = names(data, "train"), truth(args.probe, probe_dir)
    results: dict[str, dict[str, Any]] = {}
    if args.score:
        results[args.score] = score(args.score, train_names, probe)
    else:
        for emb in [e.strip() for e in args.embedders.split(",") if e.strip()]:
            out = str(work / f"clean-{emb.replace('/', '_')}")
            cfg = CleanConfig(
                data=data,
                reference=probe_dir,
                out=out,
                labels=False,
                embedder=emb,
                checkpoint=args.checkpoint if emb == "classifier" else "",
                epochs=args.epochs,
                candidates=args.candidates,
                overwrite=True,
            )
            cfg.validate()
            done = clean(cfg)
            print(f"{emb}: {done['counts']} in {done['seconds']:.0f} s {done['phase_seconds']}", flush=True)
            results[emb] = score(out, train_names, probe)
    print("\n" + table(results))
    for name, r in results.items():
        print(f"\n{name}: recall by ciFAIR judgment {r['recall_by_judgment']}; curve {r.get('curve')}")
    (work / "leak_probe.json").write_text(json.dumps({"cpu": cpu_summary(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
