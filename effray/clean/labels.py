"""Label issues: out-of-sample probabilities from K-fold fits on Ray Tune, ranked by cleanlab.

The train split is cut into ``--folds`` stratified, seeded folds. Each fold is one Tune
trial that trains :func:`effray.train.local.fit_arrays` in its own process on the other
folds (the driver's decoded arrays, shared zero-copy through the object store) and
scores its own fold; the trials run in parallel, as many as the cluster holds. One more
trial (fold -1) trains on all train rows: the model that embeds the images and scores the
evaluation splits, which it never saw (unless ``--checkpoint`` is given). Each trial
hands its result back as its Tune checkpoint, so nothing depends on a shared disk.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch
from ray.tune import Callback

from effray import console
from effray.metrics import score_batches
from effray.models.predict import predict_logits
from effray.train.checkpoint import read_payload, save_payload
from effray.train.local import fit_arrays, fitted_payload

ALL_TRAIN = -1  # the trial that trains on every train row


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified folds: each class's rows dealt round-robin over the folds in a seeded order."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF01D]))
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rng.permutation(rows)] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return out


def predict_probs(
    model: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any], batch_size: int = 512
) -> tuple[np.ndarray, float]:
    """Softmax probabilities of ``model`` on ``arrays``' images (unaugmented, fp32, on the
    model's device; ``meta["preprocess"]``, a model's, when they are stored at another size
    than it takes) and its accuracy on their labels: the one metrics pass
    (:func:`effray.metrics.score_batches`), which keeps the logits cleanlab needs."""
    model.eval()
    rows = len(arrays["label"])
    scored = score_batches(
        lambda images: predict_logits(model, images, meta["mean"], meta["std"], preprocess=meta.get("preprocess")),
        (
            (arrays["image"][i : i + batch_size], arrays["label"][i : i + batch_size])
            for i in range(0, rows, batch_size)
        ),
        int(meta["num_classes"]),
        keep_logits=True,
    )
    return torch.softmax(scored["logits"], 1).numpy(), scored["accuracy"]


def fold_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: fit on the other folds, score this one (or, for fold -1, fit on all
    and hand back the model)."""
    import ray
    import ray.tune

    torch.set_num_threads(max(1, int(config["cpus"])))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, folds = ray.get(shared["train"]), ray.get(shared["folds"])
    fold, meta = int(config["fold"]), config["meta"]
    fit_rows = np.flatnonzero(folds != fold) if fold != ALL_TRAIN else np.arange(len(folds))
    subset = lambda rows: {k: v[rows] for k, v in train.items()}  # noqa: E731
    model = fit_arrays(
        subset(fit_rows),
        meta,
        epochs=config["epochs"],
        model=config["model"],
        width=config["width"],
        batch_size=config["batch_size"],
        seed=config["seed"] + fold + 1,
        device=device,
        on_epoch=lambda epoch: ray.tune.report({"fold": fold, "epoch": epoch + 1}),
    )
    with tempfile.TemporaryDirectory() as keep:
        metrics: dict[str, Any] = {"fold": fold, "final": True}
        if fold == ALL_TRAIN:
            save_payload(keep, fitted_payload(model, meta, config["epochs"], config={"clean_fold": fold}))
        else:
            rows = np.flatnonzero(folds == fold)
            probs, metrics["accuracy"] = predict_probs(model, subset(rows), meta)
            np.save(os.path.join(keep, "rows.npy"), rows)
            np.save(os.path.join(keep, "probs.npy"), probs)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(keep))


class EpochProgress(Callback):
    """One bar over every fold trial's epochs, drawn on the driver from the trials' reports."""

    def __init__(self, total: int) -> None:
        self.total, self._bar = total, None

    def __reduce__(self) -> Any:
        return (EpochProgress, (self.total,))

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" in result and not result.get("final"):
            if self._bar is None:
                self._bar = console.bar(self.total, "fold models", "epoch")
            self._bar.update(1)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_folds(
    train: dict[str, np.ndarray],
    meta: dict[str, Any],
    folds: list[int],
    *,
    k: int,
    epochs: int,
    model: str,
    width: float,
    batch_size: int,
    seed: int,
    cpus: float,
    gpus: float,
    storage: str,
) -> dict[str, Any]:
    """Run the fold trials ``folds`` (fold numbers; :data:`ALL_TRAIN` for the full model) on
    Tune; returns ``{"probs": (N, C) out-of-fold probabilities or None, "fold_accuracy":
    [...], "model": payload or None}``."""
    import ray
    from ray import tune

    assignment = fold_assignment(train["label"], k, seed)
    shared = {"train": ray.put(train), "folds": ray.put(assignment)}
    space = {
        "fold": tune.grid_search(list(folds)),
        "meta": _plain(meta),
        "epochs": epochs,
        "model": model,
        "width": width,
        "batch_size": batch_size,
        "seed": seed,
        "cpus": cpus,
    }
    trainable = tune.with_resources(tune.with_parameters(fold_trial, shared=shared), {"cpu": cpus, "gpu": gpus})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: f"fold_{t.config['fold']}"),
        run_config=tune.RunConfig(
            name="folds",
            storage_path=os.path.abspath(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[EpochProgress(len(folds) * epochs)],
        ),
    )
    grid = tuner.fit()
    probs = (
        np.full((len(train["label"]), int(meta["num_classes"])), np.nan, np.float32)
        if any(f >= 0 for f in folds)
        else None
    )
    accuracy: dict[int, float] = {}
    payload = None
    for result in grid:
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as d:
            fold = int(result.metrics["fold"])
            if fold == ALL_TRAIN:
                payload = read_payload(d)
            else:
                probs[np.load(os.path.join(d, "rows.npy"))] = np.load(os.path.join(d, "probs.npy"))
                accuracy[fold] = float(result.metrics["accuracy"])
    return {"probs": probs, "fold_accuracy": [accuracy[f] for f in sorted(accuracy)], "model": payload}


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("classes", "num_classes", "image_shape", "mean", "std", "source", "source_checksum")
    return {k: meta[k] for k in keep if k in meta}


def label_issues(labels: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """cleanlab's label issues (``find_label_issues``, ranked by self-confidence) as rows:
    position, given and predicted class, and the probabilities of both."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, np.int64)
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return []
    # n_jobs=1: cleanlab otherwise forks a multiprocessing pool from this process, which holds torch's and
    # Ray's threads; a forked child of a threaded process can crash on exit (seen as a segfault in the suite)
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [
        {
            "position": int(i),
            "rank": r,
            "given": int(labels[i]),
            "predicted": int(probs[i].argmax()),
            "given_confidence": float(probs[i, labels[i]]),
            "predicted_confidence": float(probs[i].max()),
        }
        for r, i in enumerate(ranked)
    ]


def label_findings(
    train: dict[str, np.ndarray],
    train_probs: np.ndarray,
    emb: dict[str, np.ndarray] | None,
    evals: list[str],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The label issues of every split as findings (removed.parquet's rows): train's from the
    folds' out-of-sample probabilities, each evaluation split's from the embedding pass's
    (a model that never saw it); and that model's accuracy on each evaluation split."""
    found = [
        {**issue, "split": "train", "index": int(train["index"][issue["position"]])}
        for issue in label_issues(train["label"], train_probs)
    ]
    eval_accuracy = {}
    for split in evals:
        mask = emb["origin"] == split
        probs, labels = emb["probs"][mask], emb["label"][mask]
        eval_accuracy[split] = round(float((probs.argmax(1) == labels).mean()), 4)
        found += [
            {**issue, "split": split, "index": int(emb["index"][mask][issue["position"]])}
            for issue in label_issues(labels, probs)
        ]
    findings = [
        {
            "split": r["split"],
            "index": r["index"],
            "label": r["given"],
            "reason": "label_issue",
            "match": None,
            "duplicate_of_split": None,
            "duplicate_of_index": None,
            "score": r["given_confidence"],
            "given": r["given"],
            "predicted": r["predicted"],
            "given_confidence": r["given_confidence"],
            "predicted_confidence": r["predicted_confidence"],
            "rank": r["rank"],
        }
        for r in found
    ]
    return findings, eval_accuracy


def least_confident(findings: list[dict[str, Any]], classes: list[str], n: int) -> list[dict[str, Any]]:
    """The ``n`` label issues whose given label the model believes least, for the report."""
    issues = sorted((f for f in findings if f["reason"] == "label_issue"), key=lambda f: f["given_confidence"])
    return [
        {
            "split": f["split"],
            "index": f["index"],
            "given": classes[f["given"]],
            "predicted": classes[f["predicted"]],
            "given_confidence": f["given_confidence"],
            "predicted_confidence": f["predicted_confidence"],
        }
        for f in issues[:n]
    ]
