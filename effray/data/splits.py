"""Which rows of a source are train, val and test: stratified, seeded, exact.

Each class gives its share to val and to test (largest remainder, so the split sizes are
round(fraction x N) exactly and no class is off by more than one row); rows a source
already assigned (CIFAR's ``test_batch``) keep their split.
"""

from __future__ import annotations

import numpy as np


def _apportion(sizes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts of ``fraction`` of ``sizes`` that add up to round(fraction * N) exactly
    (largest remainder, ties broken at random)."""
    exact = fraction * sizes
    counts = np.floor(exact).astype(int)
    short = int(round(fraction * int(sizes.sum()))) - int(counts.sum())
    if short > 0:
        order = np.lexsort((rng.random(len(sizes)), -(exact - counts)))
        counts[order[:short]] += 1
    return counts


def assign_splits(
    labels: np.ndarray, fixed: np.ndarray, val_fraction: float, seed: int, test_fraction: float = 0.0
) -> np.ndarray:
    """Stratified, seeded train/val/test assignment of the rows without a fixed split; rows
    with one (a source's own test split) keep it. Without ``test_fraction`` the val rows are
    the ones earlier versions chose for the same seed."""
    splits = np.where(fixed != "", fixed, "train").astype(object)
    rng = np.random.default_rng(seed)
    free = np.flatnonzero(fixed == "")
    classes, sizes = np.unique(labels[free], return_counts=True)
    n_val = _apportion(sizes, val_fraction, rng)
    n_test = _apportion(sizes, test_fraction, rng) if test_fraction else np.zeros_like(n_val)
    for label, k_val, k_test in zip(classes, n_val, n_test):
        if k_val or k_test:
            rows = rng.permutation(free[labels[free] == label])
            splits[rows[:k_val]] = "val"
            splits[rows[k_val : k_val + k_test]] = "test"
    return splits
