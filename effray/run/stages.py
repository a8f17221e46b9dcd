"""What ``effray run`` does around its stages' own commands: the teacher's progress bar,
the clean stage kept from an earlier run, and the val split's label issues found with the
teacher once it has trained."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from effray.atomic import write_file
from effray.clean.labels import label_issues, predict_probs
from effray.clean.run import clean
from effray.console import bar, follow_jsonl, say
from effray.data.arrays import load_arrays
from effray.data.prepare import load_meta
from effray.run.plan import StagePlan
from effray.train.checkpoint import load_checkpoint
from effray.train.loop import HISTORY_FILE


def stage(name: str) -> float:
    """Say that stage ``name`` starts; returns when, for its seconds in the summary."""
    say(f"[effray run] {name} ...")
    return time.time()


def teacher_bar(run_dir: Path, epochs: int) -> Any:
    """The teacher's epochs as a bar, from rank 0's ``history.jsonl`` (its lines go to Ray's log)."""

    progress = bar(epochs, "teacher", "epoch")

    def on_record(record: dict[str, Any]) -> None:
        progress.n = min(epochs, int(record["epoch"]))
        progress.set_postfix_str(f"val_acc {record['val_accuracy']:.4f}  {record.get('images_per_s', 0):,.0f} img/s")
        progress.refresh()

    return progress, follow_jsonl(run_dir / HISTORY_FILE, on_record)


def clean_stage(plan: StagePlan) -> dict[str, Any]:
    """``effray data clean`` with the preset's settings, kept if an earlier run made it with
    the same ones (``clean_report.json`` records them); returns the report's counts."""
    report = Path(plan.clean.out) / "clean_report.json"
    if report.is_file():
        kept = json.loads(report.read_text())
        if kept.get("settings") == plan.clean.settings():
            return {"counts": kept.get("counts", {}), "dropped": kept.get("dropped"), "kept": True}
    done = clean(plan.clean)
    return {"counts": done["counts"], "dropped": done["dropped"], "kept": False}


def val_label_issues(teacher: str, data_dir: str | os.PathLike, out: Path) -> int:
    """Label issues of the val split (cleanlab on the teacher's predictions: out of sample,
    it never trained on val), written to ``out`` as Parquet; returns how many."""
    meta, val = load_meta(data_dir), load_arrays(data_dir, "val")
    model, payload = load_checkpoint(teacher, trust_code=True)  # this run's own teacher, from its preset's model
    probs, _ = predict_probs(model, val, {**meta, "preprocess": (payload.get("data") or {}).get("preprocess")})
    classes = list(meta["classes"])
    rows = [
        {
            "split": "val",
            "index": int(val["index"][r["position"]]),
            "rank": r["rank"],
            "given": classes[r["given"]],
            "predicted": classes[r["predicted"]],
            "given_confidence": r["given_confidence"],
            "predicted_confidence": r["predicted_confidence"],
        }
        for r in label_issues(val["label"], probs)
    ]
    table = pd.DataFrame(
        rows, columns=["split", "index", "rank", "given", "predicted", "given_confidence", "predicted_confidence"]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, lambda tmp: table.to_parquet(tmp, index=False))
    return len(rows)
