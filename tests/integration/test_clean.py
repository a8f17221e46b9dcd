"""`effray data clean` on real CIFAR-10 rows with injected copies, leaks and flipped labels.

The dataset (built once for the module): 900 real train rows, 150 real val rows and a
150-row reference dataset, plus, appended to train, 20 exact duplicates and 32 synthetic
copies (light: crop/flip/JPEG; re-shot: re-cropped, turned, re-coloured;
:mod:`effray.clean.calibrate`) of other train rows, 12 exact and 16 synthetic copies of val
rows, 8 exact and 16 synthetic copies of reference rows; 40 train and 8 val rows get a
wrong label. One clean run (the default pixel embedder; 2 folds of 5 epochs + the eval
model, as Tune trials on the session's 2-CPU Ray) is scored against that ground truth.

What the asserts hold: exact copies are found exactly (precision and recall >= 0.95);
synthetic copies are found as the report's own calibration promises (per kind of copy, on
copies of other images it never saw, within binomial error), mirrors, re-encodes and
re-colourings all but always; the rows flagged beyond the injected ones are no more than
the share of real images the report says lie above the threshold; the ranked candidate
list starts with injected copies; label recall >= 0.3.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from effray.cli import main

N_TRAIN, N_VAL, N_REF = 900, 150, 150


def one_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One synthetic copy of a uint8 HWC image, of ``kind`` (:data:`effray.clean.calibrate.KINDS`)."""
    import torch

    from effray.clean.calibrate import LIGHT, light_copy, reshot_copies

    if kind in LIGHT:
        return light_copy(image, kind, rng)
    return reshot_copies(image[None], kind, torch.Generator().manual_seed(int(rng.integers(2**31))))[0]


def _real_rows(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    t = pq.read_table(path, columns=["image", "label"]).slice(0, n)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in t.column("image").to_pylist()])
    return images, t.column("label").to_numpy().astype(np.int64)


@pytest.fixture(scope="module")
def dirty(ray_session, cifar_parquet, tmp_path_factory):
    """The injected dataset, its reference, and the truth: {kind: {(split, index)}}."""
    from effray.clean.calibrate import KINDS
    from effray.clean.dataset import arrays_table, write_dataset

    images, labels = _real_rows(cifar_parquet, N_TRAIN + N_VAL + N_REF)
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("clean")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    tr = slice(0, N_TRAIN)
    va = slice(N_TRAIN, N_TRAIN + N_VAL)
    rf = slice(N_TRAIN + N_VAL, None)
    train_x, train_y = list(images[tr]), list(labels[tr])
    truth: dict[str, set] = {k: set() for k in ("duplicate", "near_duplicate", "leak_exact", "leak_near", "label")}
    copy_kind: dict[tuple[str, int], str] = {}  # each injected light copy's kind
    sources = rng.permutation(N_TRAIN)
    used = iter(sources)

    def add(image, label, kind, source=None, copy=None):
        if source is not None and np.array_equal(image, source):  # a copy that came out pixel-identical is exact
            kind = "duplicate" if kind == "near_duplicate" else "leak_exact"
        train_x.append(image)
        train_y.append(label)
        truth[kind].add(("train", len(train_x) - 1))
        if copy is not None:
            copy_kind[("train", len(train_x) - 1)] = copy

    for _ in range(20):
        i = next(used)
        add(images[i], labels[i], "duplicate")
    for j in range(32):
        i = next(used)
        k = KINDS[j % len(KINDS)]
        add(one_copy(images[i], k, rng), labels[i], "near_duplicate", images[i], k)
    for base, n, exact in ((N_TRAIN, N_VAL, 12), (N_TRAIN + N_VAL, N_REF, 8)):
        picks = rng.permutation(n)[: exact + 16] + base
        for i in picks[:exact]:
            add(images[i], labels[i], "leak_exact")
        for j, i in enumerate(picks[exact:]):
            k = KINDS[j % len(KINDS)]
            add(one_copy(images[i], k, rng), labels[i], "leak_near", images[i], k)
    train_y = np.array(train_y)
    for i in list(used)[:40]:  # rows no copy was made from
        train_y[i] = (train_y[i] + rng.integers(1, 10)) % 10
        truth["label"].add(("train", int(i)))
    val_y = labels[va].copy()
    for i in rng.permutation(N_VAL)[:8]:
        val_y[i] = (val_y[i] + rng.integers(1, 10)) % 10
        truth["label"].add(("val", int(N_TRAIN + i)))
    n = len(train_y)
    data = root / "dirty"
    write_dataset(
        data,
        {
            "train": arrays_table(np.stack(train_x), train_y, np.arange(n), "train"),
            "val": arrays_table(images[va], val_y, np.arange(N_TRAIN, N_TRAIN + N_VAL), "val"),
        },
        classes,
        [32, 32, 3],
        {"source": "test:dirty", "source_checksum": "dirty0"},
    )
    reference = root / "reference"
    write_dataset(
        reference, {"test": arrays_table(images[rf], labels[rf], np.arange(N_REF), "test")}, classes, [32, 32, 3]
    )
    return {"data": data, "reference": reference, "truth": truth, "root": root, "train_rows": n, "copy_kind": copy_kind}


def _run(dirty, name: str, *extra: str) -> dict:
    """One ``effray data clean`` of the dirty dataset against its reference, and what it wrote."""
    out = dirty["root"] / name
    argv = ["--data", str(dirty["data"]), "--out", str(out), "--reference", str(dirty["reference"])]
    assert main(["data", "clean", *argv, "--calibration", "200", *extra]) == 0
    return {
        "out": out,
        "report": json.loads((out / "clean_report.json").read_text()),
        "removed": pq.read_table(out / "removed.parquet").to_pylist(),
        "candidates": pq.read_table(out / "candidates.parquet").to_pylist(),
    }


@pytest.fixture(scope="module")
def cleaned(dirty):
    return _run(dirty, "out", "--folds", "2", "--epochs", "5", "--drop", "duplicates,leaks,labels")


def _pr(found: set, truth: set) -> tuple[float, float]:
    hit = len(found & truth)
    return hit / max(1, len(found)), hit / max(1, len(truth))


def _check_near_recall(found: set, truth: set, copy_kind: dict, near: dict, easy: bool = True) -> float:
    """The calibration's promise, held on copies it never saw. Calibration reports the
    share of each kind of copy its threshold finds; the injected copies are other copies
    of other images, so their recall must be what the report's per-kind figures predict
    for this mix of kinds, within three standard deviations of a sum of Bernoulli draws (a
    small slice's luck moves it, a broken threshold or embedding does not). Mirrors,
    re-encodes and re-colourings change no geometry, and the pixel search is mirror- and
    brightness-blind: all but one are found whatever images the slice holds."""
    per_kind = near["recall_per_kind"]
    p = np.array([per_kind[copy_kind[t]] for t in sorted(truth)])
    expected, sd = p.mean(), np.sqrt((p * (1 - p)).sum()) / len(p)
    _, r = _pr(found, truth)
    assert r >= expected - 3 * sd, (r, expected, sd, per_kind)
    if easy:
        plain = {t for t in truth if copy_kind[t] in ("flip", "jpeg", "colour")}
        assert len(found & plain) >= len(plain) - 1, sorted(plain - found)
        assert min(per_kind[k] for k in ("flip", "jpeg", "colour")) >= 0.95, per_kind
    return r


def _check_false_flags(flagged: set, truth: set, report: dict, rows: int) -> int:
    """Rows flagged beyond the injected copies: no more than the report's share of real
    images above the threshold predicts for this many rows (+ 3 sd), as the report says."""
    extra = len(flagged - truth)
    rate = report["near"]["real_images_above"]
    assert extra <= rate * rows + 3 * np.sqrt(rate * rows) + 2, (extra, rate, rows)
    return extra


def _flagged(removed, reason, match=None):
    return {
        (r["split"], r["index"]) for r in removed if r["reason"] == reason and (match is None or r["match"] == match)
    }


def test_exact_duplicates_and_leaks_are_found(dirty, cleaned):
    removed, truth = cleaned["removed"], dirty["truth"]
    p, r = _pr(_flagged(removed, "duplicate"), truth["duplicate"])
    p2, r2 = _pr(_flagged(removed, "leak", "exact"), truth["leak_exact"])
    print(f"exact duplicates: precision {p:.2f} recall {r:.2f}; exact leaks: precision {p2:.2f} recall {r2:.2f}")
    assert p >= 0.95 and r >= 0.95, (p, r)
    assert p2 >= 0.95 and r2 >= 0.95, (p2, r2)
    assert all(r["split"] == "train" for r in removed if r["reason"] == "leak")  # never the evaluation side


def test_near_duplicates_and_near_leaks_are_found(dirty, cleaned):
    removed, truth, report = cleaned["removed"], dirty["truth"], cleaned["report"]
    dups, leaks = _flagged(removed, "near_duplicate"), _flagged(removed, "leak", "near")
    p, r = _pr(dups, truth["near_duplicate"])
    p2, r2 = _pr(leaks, truth["leak_near"])
    near = report["near"]
    print(
        f"near duplicates: precision {p:.2f} recall {r:.2f}; near leaks: precision {p2:.2f} recall {r2:.2f}; "
        f"threshold {near['threshold']:.3f}, calibration recall {near['recall']:.3f}, real images above "
        f"{near['real_images_above']:.3f}, per kind {near['recall_per_kind']}"
    )
    _check_near_recall(dups, truth["near_duplicate"], dirty["copy_kind"], near)
    _check_near_recall(leaks, truth["leak_near"], dirty["copy_kind"], near)
    _check_false_flags(dups | leaks, truth["near_duplicate"] | truth["leak_near"], report, dirty["train_rows"] + N_VAL)
    assert p2 >= 0.8, p2  # a leak needs a copy across splits: chance matches are rarer
    assert near["source"].startswith("calibrated") and near["threshold"] > 1.0 and near["embedder"] == "pixels"
    assert near["recall"] >= 0.7 and near["real_images_above"] <= 0.03, near


def test_candidates_rank_the_copies_first(dirty, cleaned):
    """candidates.parquet: every pair once, best first, the flag where the threshold puts
    it, leaks always a train row against the other side; the injected copies lead it."""
    cands, truth, near = cleaned["candidates"], dirty["truth"], cleaned["report"]["near"]
    scores = [c["score"] for c in cands]
    assert len(cands) > 100 and scores == sorted(scores, reverse=True)
    assert [c["rank"] for c in cands] == list(range(1, len(cands) + 1))
    assert all(c["flagged"] == (c["score"] >= near["threshold"]) for c in cands)
    assert all(c["split"] == "train" and c["match_split"] in ("val", "reference") for c in cands if c["kind"] == "leak")
    pairs = {(c["split"], c["index"], c["match_split"], c["match_index"]) for c in cands}
    assert len(pairs) == len(cands)
    injected = truth["near_duplicate"] | truth["leak_near"]
    top = [(c["split"], c["index"]) in injected for c in cands[:40]]
    print(f"candidates: {len(cands)}, injected copies among the first 40: {sum(top)}")
    assert sum(top) >= 30, sum(top)
    assert cleaned["report"]["candidates"]["pairs"] == len(cands)


def test_label_issues_recall(dirty, cleaned):
    found = _flagged(cleaned["removed"], "label_issue")
    p, r = _pr(found, dirty["truth"]["label"])
    print(f"label issues: precision {p:.2f} recall {r:.2f} ({len(found)} flagged)")
    assert r >= 0.3, (p, r)
    row = next(x for x in cleaned["removed"] if x["reason"] == "label_issue")
    assert row["given"] != row["predicted"] or row["given_confidence"] < 0.5
    assert 0 <= row["given_confidence"] <= row["predicted_confidence"] <= 1


def test_drop_writes_a_loadable_cleaned_dataset(dirty, cleaned):
    from effray.data.arrays import load_arrays
    from effray.data.prepare import load_meta

    data = cleaned["out"] / "data"
    meta = load_meta(data)
    gone = {(r["split"], r["index"]) for r in cleaned["removed"] if r["dropped"]}
    train = load_arrays(data, "train")
    assert (
        meta["counts"]["train"]
        == len(train["label"])
        == dirty["train_rows"] - len({g for g in gone if g[0] == "train"})
    )
    assert not ({("train", int(i)) for i in train["index"]} & gone)
    assert sum(meta["counts_per_class"]["train"]) == meta["counts"]["train"]
    x = train["image"].astype(np.float64) / 255
    assert np.allclose(meta["mean"], x.mean((0, 1, 2)), atol=1e-6)
    c = meta["cleaning"]
    assert c["source_checksum"] == "dirty0" and c["reasons"] == ["duplicates", "leaks", "labels"]
    assert meta["source_checksum"] != "dirty0"
    assert meta["counts"]["val"] == N_VAL - len({g for g in gone if g[0] == "val"})  # val loses only label issues


def test_the_pixel_embedder_trains_nothing_and_repeats_itself(dirty, cleaned, capsys):
    """``--no-labels`` with the default pixel embedder: no model is trained or loaded (no
    Tune trial), and the near findings and candidates are the labelled run's, exactly."""
    run = _run(dirty, "no-labels", "--no-labels", "--actors", "1")  # one embedding process: no pool to start
    assert "Tune trials" not in capsys.readouterr().out
    near = lambda removed: sorted(  # noqa: E731
        (r["split"], r["index"], r["reason"], r["duplicate_of_index"]) for r in removed if r["match"] == "near"
    )
    assert near(run["removed"]) == near(cleaned["removed"])
    assert run["candidates"] == cleaned["candidates"]
    assert run["report"]["labels"] is None and "label_issue" not in run["report"]["counts"]


def test_a_classifier_embedder_from_a_checkpoint(dirty, teacher, capsys):
    """``--embedder CHECKPOINT``: that classifier's features embed every image (no Tune trial
    trains one), scored by the same relative score, and copies are found as its own
    calibration promises."""
    run = _run(dirty, "with-checkpoint", "--no-labels", "--embedder", str(teacher), "--actors", "1")
    assert "Tune trials" not in capsys.readouterr().out  # nothing trained
    report, truth = run["report"], dirty["truth"]
    near = _flagged(run["removed"], "near_duplicate") | _flagged(run["removed"], "leak", "near")
    injected = truth["near_duplicate"] | truth["leak_near"]
    p, r = _pr(near, injected)
    print(f"--embedder CKPT: near copies precision {p:.2f} recall {r:.2f}, threshold {report['near']['threshold']:.3f}")
    assert report["near"]["embedder"] == str(teacher) and "classifier" in report["near"]["embedding"]
    _check_near_recall(near, injected, dirty["copy_kind"], report["near"], easy=False)
    _check_false_flags(near, injected, report, dirty["train_rows"] + N_VAL)


def test_report_files(cleaned):
    out, report = cleaned["out"], cleaned["report"]
    for name in report["files"]:
        assert (out / name).exists(), name
    assert {"candidates.parquet", "candidates.png", "duplicates.png", "label_issues.png"} <= set(report["files"])
    assert report["counts"]["duplicate"] >= 19 and report["per_class"]["leak"]
    md = (out / "clean_report.md").read_text()
    assert "Threshold" in md and "label_issue" in md and "Dropped" in md and "Candidates for review" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]  # no temporary left


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{root}", "--out", "{root}/o1"], "is not a prepared dataset"),
        (["--data", "{data}", "--out", "{root}/o2", "--folds", "1"], "--folds must be >= 2"),
        (["--data", "{data}", "--out", "{root}/o3", "--drop", "duplicates,typos"], "unknown --drop reason typos"),
        (["--data", "{data}", "--out", "{data}"], "already exists; pass --overwrite"),
        (["--data", "{data}", "--out", "{root}/o4", "--checkpoint", "{ckpt}"], "is for 5 classes"),
        (["--data", "{data}", "--out", "{root}/o5", "--reference", "{ref16}"], "copies can't match across sizes"),
        (["--data", "{data}", "--out", "{root}/o6", "--embedder", "{ckpt16}"], "takes [16, 16, 3] images"),
        (["--data", "{data}", "--out", "{root}/o7", "--embedder", "nope"], "is neither pixels nor classifier"),
        (["--data", "{data}", "--out", "{root}/o8", "--embedder", "{ckpt}", "--checkpoint", "{ckpt}"], "pass one"),
        (["--data", "{data}", "--out", "{root}/o9", "--shortlist", "10"], "--shortlist must be >= 30"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(dirty, args, message, capsys):
    import torch

    from effray.clean.dataset import arrays_table, write_dataset
    from effray.models import build_model
    from effray.train.checkpoint import save_payload
    from effray.train.local import fitted_payload

    root = dirty["root"]
    ckpt, ckpt16, ref16 = (root / n for n in ("ckpt5", "ckpt16", "ref16"))
    for path, classes, shape in ((ckpt, 5, [32, 32, 3]), (ckpt16, 10, [16, 16, 3])):
        if not path.exists():
            meta = {
                "classes": [str(c) for c in range(classes)],
                "num_classes": classes,
                "image_shape": shape,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
            }
            torch.manual_seed(0)
            save_payload(path, fitted_payload(build_model("convnet", classes, 3, 0.5), meta, 0))
    if not ref16.exists():
        small = np.zeros((4, 16, 16, 3), np.uint8)
        write_dataset(
            ref16, {"test": arrays_table(small, np.arange(4), np.arange(4), "test")}, list("abcd"), [16, 16, 3]
        )
    before = sorted(p.name for p in root.iterdir())
    argv = [a.format(root=root, data=dirty["data"], ckpt=ckpt, ckpt16=ckpt16, ref16=ref16) for a in args]
    assert main(["data", "clean", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in root.iterdir()) == before


def test_a_failure_midway_leaves_nothing(dirty, monkeypatch):
    import effray.clean.run as run

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(run, "hash_pass", boom)
    out = dirty["root"] / "fails"
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["data", "clean", "--data", str(dirty["data"]), "--out", str(out)])
    assert not out.exists() and not [p for p in dirty["root"].iterdir() if p.name.startswith(".fails")]


@pytest.mark.parametrize("n_keys,block,k", [(97, 16, 5), (64, 64, 3), (50, 7, 8)])
def test_blockwise_knn_matches_brute_force(ray_session, n_keys, block, k):
    """Queries against a larger key set holding them, blocks that do not divide N, several views."""
    from effray.clean.knn import brute_knn, knn

    rng = np.random.default_rng(n_keys)
    keys = rng.normal(size=(n_keys, 2, 6)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=2, keepdims=True)
    queries = keys[: n_keys // 2]
    got_s, got_i = knn(queries, keys, k, block)
    want_s, want_i = brute_knn(queries, keys, k)
    assert np.allclose(got_s, want_s, atol=1e-5)
    assert (got_i == want_i).mean() > 0.99  # ties aside, the same neighbours
    assert not (got_i == np.arange(len(queries))[:, None]).any()  # never itself
