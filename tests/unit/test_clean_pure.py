"""The cleaning step's pure pieces: hashing, synthetic copies, the pixel embedder's views,
the relative score, the threshold, the grouping rules and the ranked candidates."""

from __future__ import annotations

import numpy as np
import torch
from helpers import save_checkpoint

from effray.clean import pixels
from effray.clean.calibrate import KINDS, LIGHT, RESHOT, choose_threshold, light_copies, light_copy, synthetic_copies
from effray.clean.duplicates import exact_findings, image_hashes, near_findings
from effray.clean.knn import baseline, relative_block, relative_score
from effray.clean.near import expected_precision, ranked_pairs


def _smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Random low-frequency uint8 images: photo-like enough that a shifted copy still matches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_hashes_equal_exactly_for_equal_pixels():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[2, 0, 0, 0] ^= 1
    ha, hb = image_hashes(a), image_hashes(b)
    assert ha[0] == hb[0] and ha[1] == hb[1] and ha[2] != hb[2]
    assert image_hashes(a.reshape(3, 4, 16, 3))[0] != ha[0]  # same bytes, other shape


def test_light_copies_are_seeded_and_change_the_image():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    c1, src, kind = light_copies(images, seed=3)
    c2, _, _ = light_copies(images, seed=3)
    assert c1.shape == (16, 32, 32, 3) and np.array_equal(c1, c2) and list(kind[:4]) == list(LIGHT)
    assert np.array_equal(light_copy(images[0], "flip", rng), images[0][:, ::-1])
    assert all(not np.array_equal(c, images[s]) for c, s in zip(c1, src))


def test_synthetic_copies_cover_every_kind_seeded_and_stay_recognisable():
    images = _smooth_images(6, 0)
    c1, src, kind = synthetic_copies(images, seed=5)
    c2, _, _ = synthetic_copies(images, seed=5)
    c3, _, _ = synthetic_copies(images, seed=6)
    assert c1.shape == (6 * len(KINDS), 32, 32, 3) and c1.dtype == np.uint8
    assert np.array_equal(c1, c2) and not np.array_equal(c1, c3)
    assert sorted(set(kind)) == sorted(KINDS) and all((kind == k).sum() == 6 for k in KINDS)
    reshot = np.isin(kind, RESHOT)
    assert all(not np.array_equal(c, images[s]) for c, s in zip(c1[reshot], src[reshot]))
    # a re-shot copy is closer, after the alignment search, to its own source than to any other image
    th, copies = pixels.thumbnails(torch.from_numpy(images)), pixels.thumbnails(torch.from_numpy(c1[reshot]))
    keys = pixels.fine(th)[None].expand(int(reshot.sum()), -1, -1)
    sims = pixels.best_view_similarity(pixels.fine_views(copies), keys)
    assert (sims.argmax(1).numpy() == src[reshot]).mean() >= 0.9, sims


def test_fine_views_hold_the_image_its_mirror_and_its_shifts():
    images = _smooth_images(5, 1)
    th = pixels.thumbnails(torch.from_numpy(images))
    views = pixels.fine_views(th)
    assert views.shape == (5, pixels.VIEWS, 3 * pixels.FINE**2)
    assert torch.allclose(views.norm(dim=2), torch.ones(5, pixels.VIEWS), atol=1e-5)
    own = pixels.fine(th)
    assert torch.allclose(pixels.best_view_similarity(views, own[:, None]), torch.ones(5, 1), atol=1e-5)
    mirrored = pixels.fine(pixels.thumbnails(torch.from_numpy(np.ascontiguousarray(images[:, :, ::-1]))))
    assert torch.allclose(pixels.best_view_similarity(views, mirrored[:, None]), torch.ones(5, 1), atol=1e-5)
    shifted = np.roll(images, 1, axis=2)  # 1 px right: a view undoes it but for the column that wrapped
    moved = pixels.fine(pixels.thumbnails(torch.from_numpy(shifted)))
    plain = (own * moved).sum(1)
    aligned = pixels.best_view_similarity(views, moved[:, None])[:, 0]
    assert (aligned > 0.97).all() and (aligned > plain).all(), (plain, aligned)


def test_thumbnails_take_any_size():
    big = _smooth_images(2, 2, size=64)
    th = pixels.thumbnails(torch.from_numpy(big))
    assert th.shape == (2, 3, pixels.THUMB, pixels.THUMB) and th.dtype == torch.uint8
    small = pixels.thumbnails(torch.from_numpy(_smooth_images(2, 2, size=20)))
    assert small.shape == (2, 3, pixels.THUMB, pixels.THUMB)


def test_baseline_and_relative_score():
    sims = torch.tensor([[0.99] + [0.5] * 40, [0.9, 0.8] + [-torch.inf] * 39])
    b = baseline(sims, (10, 30))
    assert torch.allclose(b, torch.tensor([0.5, 0.8]))  # the second has one other neighbour: its baseline
    r = relative_score(sims[:, :2].numpy(), b.numpy())
    assert np.allclose(r[0], [0.5 / 0.01, 1.0], rtol=1e-4) and np.isclose(r[1, 0], 0.2 / 0.1)
    assert relative_score(np.array([[-np.inf]]), np.array([0.3]))[0, 0] == 0.0
    assert np.isfinite(relative_score(np.array([[1.0]]), np.array([0.3]))).all()  # an exact copy: large, finite


def test_relative_block_matches_a_brute_force_search():
    """The two-pass search of one block (no Ray): the shortlist is the coarse pass's top m,
    re-scored by the best fine view; with m = all keys it is the brute-force best view."""
    images = _smooth_images(40, 3)
    images[7] = np.roll(images[3], 1, axis=1)  # a shifted copy of row 3
    th = pixels.thumbnails(torch.from_numpy(images))
    coarse, fine = pixels.coarse_views(th).numpy(), pixels.fine(th).numpy()
    ids = np.arange(40)
    sims, where, base = relative_block(coarse, coarse[:, :1], 0, 40, 5, 39, 16, ids, ids, th.numpy(), fine)
    full = pixels.best_view_similarity(pixels.fine_views(th), torch.from_numpy(fine)[None].expand(40, -1, -1))
    full.fill_diagonal_(-torch.inf)
    want_s, want_i = torch.sort(full, 1, descending=True)
    assert np.allclose(sims, want_s[:, :5].numpy(), atol=1e-5)
    assert (where == want_i[:, :5].numpy()).mean() > 0.98 and where[7, 0] == 3 and where[3, 0] == 7
    assert np.allclose(base, baseline(want_s).numpy(), atol=1e-5)
    assert not (where == ids[:, None]).any()


def test_threshold_separates_and_caps_the_false_positive_rate():
    pos = np.linspace(0.9, 1.0, 100)
    neg = np.linspace(0.0, 0.8, 100)
    t = choose_threshold(pos, neg)
    assert 0.8 < t["threshold"] <= 0.9 and t["tpr"] == 1.0 and t["fpr"] == 0.0
    overlap = choose_threshold(np.linspace(0.5, 1.0, 100), np.linspace(0.0, 0.7, 100), max_fpr=0.01)
    assert overlap["fpr"] <= 0.01 and overlap["threshold"] >= 0.69
    # an image whose nearest neighbour is as close as a median copy has a copy itself: not a negative
    assert choose_threshold(pos, np.r_[neg, [0.99, 1.0]])["trimmed"] == 2
    assert choose_threshold(pos, np.r_[neg, [0.85, 0.99]], trim_at=0.84)["trimmed"] == 2


def test_exact_rules_within_splits_and_leaks_from_train_only():
    origin = np.array(["train", "train", "train", "val", "val", "reference", "train"], dtype=object)
    index = np.array([0, 1, 2, 10, 11, 0, 3])
    label = np.zeros(7, np.int64)
    hashes = np.array(["a", "a", "b", "b", "c", "c", "d"], dtype=object)
    found = {(f["split"], f["index"], f["reason"]) for f in exact_findings(origin, index, label, hashes)}
    assert found == {("train", 1, "duplicate"), ("train", 2, "leak")}


def test_near_pairs_do_not_chain_and_leaks_go_to_train():
    origin = np.array(["train", "train", "train", "val"], dtype=object)
    index, label = np.arange(4), np.zeros(4, np.int64)
    neighbours = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    scores = np.array([[0.95, 0.5], [0.95, 0.5], [0.97, 0.5], [0.97, 0.2]])
    found = near_findings(origin, index, label, neighbours, scores, np.arange(4), 0.9, set())
    assert {(f["index"], f["reason"], f["duplicate_of_index"]) for f in found} == {
        (1, "near_duplicate", 0),
        (2, "leak", 3),
    }


def test_ranked_pairs_once_each_best_first_and_only_leaks_or_same_split():
    origin = np.array(["train", "train", "val", "reference", "reference"], dtype=object)
    where = np.array([[1, 3], [0, 2], [1, -1], [0, 4], [3, 2]])
    sims = np.full(where.shape, 0.9)
    scores = np.array([[5.0, 3.0], [6.0, 1.5], [2.0, 0.0], [4.0, 9.0], [9.0, 8.0]])
    hashes = np.array([b"a", b"b", b"c", b"d", b"e"], dtype=object)
    c = ranked_pairs(origin, hashes, where, sims, scores, threshold=2.5, top=10)
    pairs = list(zip(c["a"].tolist(), c["b"].tolist(), c["kind"].tolist()))
    # (0, 1) twice -> once at 6.0; reference-reference and reference-val never; train is always ``a`` of a leak
    assert pairs == [(1, 0, "near_duplicate"), (0, 3, "leak"), (1, 2, "leak")], pairs
    assert c["score"].tolist() == [6.0, 4.0, 2.0] and c["flagged"].tolist() == [True, True, False]
    assert len(ranked_pairs(origin, hashes, where, sims, scores, 2.5, top=1)["a"]) == 1
    # an exact copy (equal hashes) is the exact pass's finding, never a candidate
    hashes[0] = hashes[1]
    c = ranked_pairs(origin, hashes, where, sims, scores, threshold=2.5, top=10)
    assert list(zip(c["a"].tolist(), c["b"].tolist())) == [(0, 3), (1, 2)]


def test_expected_leak_precision_discounts_chance_matches():
    origin = np.array(["train"] * 4 + ["reference"] * 6, dtype=object)
    where = np.array([[4]] * 4 + [[0], [1], [2], [3], [3], [3]])
    scores = np.array([[1.0]] * 4 + [[5.0], [5.0], [5.0], [5.0], [1.0], [1.0]])
    est = expected_precision(origin, where, scores, threshold=2.0, fpr=0.1)
    assert est == {"eval_images": 6, "eval_images_flagged": 4, "leak_precision_at_least": round(1 - 0.6 / 4, 3)}
    # a leak seen from the train row's side counts too
    where[0], scores[0] = [9], [3.0]
    assert expected_precision(origin, where, scores, threshold=2.0, fpr=0.1)["eval_images_flagged"] == 5


def test_a_classifier_of_another_input_size_embeds_through_its_own_preprocessing(tmp_path):
    """`data clean --checkpoint/--embedder` of a model trained at 16 px on rows stored at 32 px:
    its recorded resize makes its input, as evaluate feeds it; without one it is refused."""
    import pytest

    from effray.clean.embed import Embedder
    from effray.clean.run import check_checkpoint
    from effray.data.augment import model_input
    from effray.errors import EffrayError
    from effray.models import build_model
    from effray.train.checkpoint import data_summary

    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, 0.25)
    meta16 = {"classes": [str(c) for c in range(10)], "num_classes": 10, "image_shape": [16, 16, 3]}
    meta16 |= {"mean": [0.5] * 3, "std": [0.25] * 3}
    saved = {}
    for name, recorded in (("resized", {"image_shape": [16, 16, 3], "preprocess": "resize(16)"}), ("bare", None)):
        saved[name] = save_checkpoint(tmp_path / name, model, data=data_summary(meta16, recorded))
    data_meta = {**meta16, "image_shape": [32, 32, 3], "source": "rows stored at 32 px"}
    payload = check_checkpoint(str(saved["resized"]), data_meta)
    with pytest.raises(EffrayError, match=r"takes \[16, 16, 3\] images, the dataset's are \[32, 32, 3\] and it rec"):
        check_checkpoint(str(saved["bare"]), data_meta)
    images = _smooth_images(4, 3, size=32)
    out = Embedder(payload, payload["data"]["mean"], payload["data"]["std"])({"image": images, "index": np.arange(4)})
    with torch.no_grad():  # the model on its own input: the 32 px rows resized to 16, then normalised
        want = torch.softmax(
            model.eval()(model_input(torch.from_numpy(images), "resize(16)", [0.5] * 3, [0.25] * 3)), 1
        )
    assert out["probs"].shape == (4, 10)
    np.testing.assert_allclose(out["probs"], want.numpy(), atol=1e-5)
