"""effray.metrics against cases worked out by hand: a 3-class confusion, ECE of a calibrated
and of an over-confident predictor, the figures written whole, and temperature scaling
recovering the temperature a synthetic set was distorted by."""

from __future__ import annotations

import math

import pytest
import torch

from effray.metrics import (
    GRID_TEMPERATURES,
    TEMPERATURE_RANGE,
    accuracy_interval,
    classification_metrics,
    fit_temperature,
    scaled_calibration,
    score_batches,
    write_figures,
)


def one_hot_logits(predicted: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float() * 20.0


def test_three_class_confusion_by_hand():
    # true 0 0 0 1 1 2, predicted 0 0 1 1 2 2
    m = classification_metrics(one_hot_logits([0, 0, 1, 1, 2, 2], 3), torch.tensor([0, 0, 0, 1, 1, 2]), ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 0.5])
    assert [pc[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [pc[c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [pc[c]["support"] for c in "abc"] == [3, 2, 1]
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert (m["worst_class"], m["worst_class_recall"]) == ("b", pytest.approx(0.5))
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_a_class_never_predicted_scores_zero_and_an_absent_class_is_not_the_worst():
    # class c never occurs; class b occurs but is never predicted
    m = classification_metrics(one_hot_logits([0, 0, 0, 0], 3), torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["worst_class"] == "b" and m["worst_class_recall"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 * 0.5 * 1 / 1.5 + 0.0) / 2)  # over the classes present


def confident(p: float, n: int, correct: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n predictions of class 0 at confidence p (the rest spread evenly), ``correct`` of them right."""
    probs = torch.full((n, classes), (1 - p) / (classes - 1))
    probs[:, 0] = p
    labels = torch.tensor([0] * correct + [1] * (n - correct))
    return probs.log(), labels


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_when_overconfident():
    calibrated = classification_metrics(*confident(0.8, 100, 80), ["a", "b", "c"])
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibrated["nll"] == pytest.approx(0.8 * -math.log(0.8) + 0.2 * -math.log(0.1), rel=1e-5)
    over = classification_metrics(*confident(0.99, 100, 50), ["a", "b", "c"])
    assert over["ece"] == pytest.approx(0.49, abs=1e-5)
    (full,) = [b for b in over["reliability"] if b["count"]]
    assert full["count"] == 100 and full["confidence"] == pytest.approx(0.99) and full["accuracy"] == 0.5
    assert full["lo"] <= 0.99 < full["hi"]


def test_reliability_bins_reproduce_torchmetrics_ece():
    torch.manual_seed(0)
    logits, labels = torch.randn(1000, 10) * 2, torch.randint(0, 10, (1000,))
    m = classification_metrics(logits, labels, [str(i) for i in range(10)])
    gap = sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in m["reliability"]) / 1000
    assert gap == pytest.approx(m["ece"], abs=1e-6) and sum(b["count"] for b in m["reliability"]) == 1000


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="3 classes"):
        classification_metrics(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), ["a", "b", "c"])


def test_figures_are_written_whole(tmp_path):
    m = classification_metrics(*confident(0.7, 50, 30), ["airplane", "bird", "cat"])
    paths = write_figures(m, tmp_path / "figs", title="teacher")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["confusion.png", "reliability.png"]
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def calibrated_set(n: int = 20_000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3.0
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("distortion", [0.4, 2.5])  # under-confident (label smoothing's way), over-confident
def test_temperature_scaling_recovers_the_distortion_and_lowers_ece(distortion):
    logits, labels = calibrated_set()
    bent = logits * distortion  # softmax(bent / T) is the calibrated one at T = distortion
    t = fit_temperature(bent, labels)
    assert t == pytest.approx(distortion, rel=0.03)
    before = classification_metrics(bent, labels, [str(i) for i in range(10)])
    after = scaled_calibration(bent, labels)
    assert after["temperature"] == t
    assert after["ece_scaled"] <= before["ece"] and after["ece_scaled"] < 0.02 < before["ece"]
    assert after["nll_scaled"] < before["nll"]
    assert fit_temperature(bent, labels) == t  # deterministic


@pytest.mark.parametrize("distortion", [0.4, 1.0, 2.5])
def test_the_one_pass_scores_calibration_on_its_temperature_grid_as_sums(distortion):
    """What every epoch reports: the ECE at T = 1 exactly as torchmetrics bins it, and the
    grid temperature of least NLL within one grid step of the fitted T, with an ECE after
    it close to the fitted one's; batch by batch, as added over a split and over ranks."""
    logits, labels = calibrated_set()
    bent = logits * distortion
    batches = [(bent[i : i + 1000], labels[i : i + 1000]) for i in range(0, len(bent), 1000)]
    m = score_batches(lambda x: x, batches, 10)
    direct = classification_metrics(bent, labels, [str(i) for i in range(10)])
    fitted = scaled_calibration(bent, labels)
    step = GRID_TEMPERATURES[1] / GRID_TEMPERATURES[0]
    assert GRID_TEMPERATURES[len(GRID_TEMPERATURES) // 2] == pytest.approx(1.0)
    assert m["ece"] == pytest.approx(direct["ece"], abs=1e-5)  # float64 sums against torchmetrics float32
    assert fitted["temperature"] / step**0.5 <= m["temperature"] <= fitted["temperature"] * step**0.5
    assert m["ece_scaled"] == pytest.approx(fitted["ece_scaled"], abs=0.01) and m["ece_scaled"] < 0.02
    assert m["nll_scaled"] == pytest.approx(fitted["nll_scaled"], rel=0.01)
    empty = score_batches(lambda x: x, [], 10)
    assert math.isnan(empty["ece_scaled"]) and empty["count"] == 0


def test_a_calibrated_set_keeps_about_one_and_a_recorded_temperature_is_applied_as_given():
    logits, labels = calibrated_set(seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.03)
    given = scaled_calibration(logits, labels, temperature=2.0)
    direct = classification_metrics(logits / 2.0, labels, [str(i) for i in range(10)])
    assert given == {"temperature": 2.0, "ece_scaled": direct["ece"], "nll_scaled": direct["nll"]}
    with pytest.raises(ValueError, match="> 0"):
        scaled_calibration(logits, labels, temperature=0.0)


def test_degenerate_sets_give_a_finite_bounded_temperature():
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert fit_temperature(torch.zeros(5, 3), labels) == 1.0  # logits that say nothing: nothing to scale
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    # all right, one class: sharper is always better, so the fit stops at the bound
    sure = fit_temperature(torch.tensor([[4.0, 0.0, 0.0]] * 6), torch.zeros(6, dtype=torch.long))
    assert sure == pytest.approx(TEMPERATURE_RANGE[0], rel=1e-6)
    # all wrong: flatter is always better, up to the other bound
    wrong = fit_temperature(torch.tensor([[4.0, 0.0, 0.0]] * 6), torch.ones(6, dtype=torch.long))
    assert wrong == pytest.approx(TEMPERATURE_RANGE[1], rel=1e-6)
    # a diverged model's non-finite rows weigh nothing; all of them non-finite: T stays 1
    logits, y = calibrated_set(n=2000, seed=2)
    broken = torch.cat([logits * 2.0, torch.full((50, 10), float("nan"))])
    y_broken = torch.cat([y, torch.zeros(50, dtype=torch.long)])
    assert fit_temperature(broken, y_broken) == pytest.approx(fit_temperature(logits * 2.0, y), rel=1e-9)
    assert fit_temperature(torch.full((4, 3), float("inf")), torch.zeros(4, dtype=torch.long)) == 1.0
    with pytest.raises(ValueError, match="don't match"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    ("correct", "count", "low", "high"),
    # the Wilson interval at z = 1.96 worked out by hand (Newcombe 1998, table I: 81/263 -> 0.2553-0.3662)
    [(81, 263, 0.2553, 0.3662), (50, 100, 0.4038, 0.5962), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0)],
)
def test_the_accuracy_interval_is_wilsons(correct, count, low, high):
    got = accuracy_interval(correct, count)
    assert got == pytest.approx((low, high), abs=5e-5) and 0.0 <= got[0] <= correct / count <= got[1] <= 1.0


def test_the_interval_narrows_as_the_square_root_of_the_images_and_is_nan_without_any():
    width = [accuracy_interval(0.9 * n, n)[1] - accuracy_interval(0.9 * n, n)[0] for n in (1_000, 4_000)]
    assert width[0] / width[1] == pytest.approx(2.0, rel=0.02)
    assert all(math.isnan(v) for v in accuracy_interval(0, 0))


def test_calibration_sums_chunk_the_temperatures_for_many_classes_and_add_the_same(monkeypatch):
    import effray.metrics as metrics

    logits, labels = calibrated_set(n=512)
    whole = metrics.class_sums(logits, labels, 10)
    monkeypatch.setattr(metrics, "_GRID_ELEMENTS", 5_000)  # one temperature per chunk for 512 x 10 logits
    torch.testing.assert_close(metrics.class_sums(logits, labels, 10), whole)
