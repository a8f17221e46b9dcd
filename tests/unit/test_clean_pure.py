"""The cleaning step's pure pieces: hashing, light copies, the threshold, the grouping rules."""

from __future__ import annotations

import numpy as np

from effray.clean.calibrate import KINDS, choose_threshold, light_copies, light_copy
from effray.clean.duplicates import exact_findings, image_hashes, near_findings
from effray.clean.knn import brute_knn, row_similarity


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
    assert c1.shape == (16, 32, 32, 3) and np.array_equal(c1, c2) and list(kind[:4]) == list(KINDS)
    assert np.array_equal(light_copy(images[0], "flip", rng), images[0][:, ::-1])
    assert all(not np.array_equal(c, images[s]) for c, s in zip(c1, src))


def test_threshold_separates_and_caps_the_false_positive_rate():
    pos = np.linspace(0.9, 1.0, 100)
    neg = np.linspace(0.0, 0.8, 100)
    t = choose_threshold(pos, neg)
    assert 0.8 < t["threshold"] <= 0.9 and t["tpr"] == 1.0 and t["fpr"] == 0.0
    overlap = choose_threshold(np.linspace(0.5, 1.0, 100), np.linspace(0.0, 0.7, 100), max_fpr=0.01)
    assert overlap["fpr"] <= 0.01 and overlap["threshold"] >= 0.69
    # an image whose nearest neighbour is as close as a median copy has a copy itself: not a negative
    assert choose_threshold(pos, np.r_[neg, [0.99, 1.0]])["trimmed"] == 2


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


def test_row_similarity_is_the_knn_measure():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 3, 4)).astype(np.float32)
    a /= np.linalg.norm(a, axis=2, keepdims=True)
    sims, _ = brute_knn(a, a[::-1].copy(), 5, query_ids=np.arange(5), key_ids=np.arange(10, 15))
    direct = row_similarity(a, a)
    assert np.allclose(direct, 1.0, atol=1e-5)
    assert sims.shape == (5, 5)
