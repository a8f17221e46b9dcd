"""The search's choice scored on the test split: the estimate of what it will do on new images.

Trials are stopped, ranked and picked on val, and the best of many on one split scores
higher there than it will elsewhere (the winner's curse: the demo's pick lost 1.6 points
on 10,000 held-out images). The test split (``data prepare --test-fraction``, or the
source's own) is read once, after the search: the teacher and every model on a Pareto
front (with ``--max-drop`` or a tail limit, also every model within them: the pick's
candidates) are scored on it by the one metrics pass, each accuracy with its 95 % Wilson
interval, and the ECE after the temperature each model recorded on val (so calibration
is judged on rows T was not fitted on). ``test.json`` sits beside ``teacher.json``; the
report reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effray.atomic import write_json
from effray.compress.artifact import load_artifact, temperature_of
from effray.compress.measure import class_scores
from effray.compress.run import teacher_input
from effray.data.arrays import eval_batches, load_arrays
from effray.metrics import accuracy_interval
from effray.search.constraints import Constraints
from effray.search.fronts import add_pareto_columns, on_a_front
from effray.search.results import TEST_FILE, load_trials
from effray.train.checkpoint import load_checkpoint

SCORES = ("accuracy", "macro_f1", "worst_class_recall", "ece", "ece_scaled")  # what test.json keeps per model


def front_artifacts(
    experiment: str | Path, teacher: dict[str, Any] | None = None, limits: Constraints | None = None
) -> dict[str, str]:
    """``{trial_id: artifact}`` of every model on any of the experiment's Pareto fronts and,
    with active ``limits``, of every model within them (the pick's candidates)."""
    table = add_pareto_columns(load_trials(experiment))
    chosen = on_a_front(table)
    if limits is not None and limits.active and teacher is not None:
        chosen |= limits.within(table, teacher)
    front = table[chosen]
    return {str(r["trial_id"]): str(r["artifact"]) for _, r in front.iterrows() if isinstance(r.get("artifact"), str)}


def holdout_scores(model: Any, batches: list, temperature: float | None) -> dict[str, Any]:
    """One model on the test batches: :data:`SCORES`, the images, and the accuracy's interval."""
    m = class_scores(model, batches, temperature)
    n = int(m["eval_images"])
    low, high = accuracy_interval(round(m["accuracy"] * n), n)
    return {**{k: float(m[k]) for k in SCORES if k in m}, "images": n, "accuracy_low": low, "accuracy_high": high}


def score_test_split(
    experiment: str | Path,
    data_dir: str,
    meta: dict[str, Any],
    teacher: str,
    teacher_metrics: dict[str, Any],
    batch_size: int,
    trust_code: bool = False,
    limits: Constraints | None = None,
) -> dict[str, Any] | None:
    """The teacher and the front scored on ``data_dir``'s test split and written to
    ``EXPERIMENT/test.json``; None (and nothing written) when the dataset has no test split."""
    if "test" not in meta["splits"]:
        return None
    model, payload = load_checkpoint(teacher, trust_code)
    batches = eval_batches(load_arrays(data_dir, "test"), teacher_input(meta, payload), batch_size)
    scores: dict[str, Any] = {
        "split": "test",
        "selected_on": "val",
        "interval": "95 % Wilson",
        "teacher": holdout_scores(model, batches, teacher_metrics.get("temperature")),
        "trials": {},
    }
    for trial_id, path in sorted(front_artifacts(experiment, teacher_metrics, limits).items()):
        student, artifact = load_artifact(path, trust_code=True)  # written by this search's trials
        scores["trials"][trial_id] = holdout_scores(student, batches, temperature_of(artifact))
    scores["images"] = scores["teacher"]["images"]
    write_json(Path(experiment) / TEST_FILE, scores)
    return scores
