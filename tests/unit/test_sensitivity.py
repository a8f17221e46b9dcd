"""Per-layer sensitivity probes, in-process on real CIFAR-10 images: each probe changes its
one layer as it says (k-bit codes, exactly round(r*n) zeros, a coupled channel group cut
out of a torchvision ResNet) and nothing else, never the model it was given; fewer bits
cost more; bad settings fail in one line.

Probes are scored against the unchanged model's own predictions: its accuracy is then
exactly 1.0 and every drop is the probe's alone, without training a model here."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from effray.cli import main
from effray.compress.sensitivity import (
    SensitivityConfig,
    Setting,
    layer_names,
    probe_layer,
    score,
    with_bits,
    with_drops,
    with_zeros,
    without_channels,
)
from effray.compress.sensitivity_run import worst_per_layer
from effray.config import validated
from effray.data.image_bytes import decode_image
from effray.data.images import normalize_tensor
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@pytest.fixture(scope="module")
def images(cifar_parquet) -> torch.Tensor:
    """128 real CIFAR-10 images, normalised as effray normalises a batch."""
    table = pq.ParquetFile(cifar_parquet).read_row_group(0, columns=["image"]).slice(0, 128)
    pixels = np.stack([decode_image(b, 3) for b in table.column("image").to_pylist()])
    return normalize_tensor(torch.from_numpy(pixels), CIFAR_MEAN, CIFAR_STD)


def convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", 10, 3, 0.5).eval()


def own_labels(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        labels = model(images).argmax(1)
    return [(images[i : i + 64], labels[i : i + 64]) for i in range(0, len(images), 64)]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], but: str = "") -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not (but and k.startswith(but)))


def test_two_bits_cost_more_than_eight_and_the_baseline_is_the_model_itself(images):
    model = convnet()
    batches = own_labels(model, images)
    baseline = score(model, batches)
    assert baseline["accuracy"] == 1.0 and baseline["count"] == 128
    rows = with_drops(probe_layer(model, "block1.0", [Setting("bits", 2), Setting("bits", 8)], batches), baseline)
    two, eight = rows
    assert (two["kind"], two["value"], eight["value"]) == ("bits", 2.0, 8.0)
    assert two["params"] == eight["params"] == 32 * 16 * 9 and two["skipped_reason"] == ""
    assert two["accuracy_drop"] > eight["accuracy_drop"] + 0.05, rows
    assert two["loss_increase"] > eight["loss_increase"] > -1e-3, rows
    assert eight["accuracy_drop"] <= 0.03, rows
    assert worst_per_layer(rows)["block1.0"]["setting"] == "2-bit"


def test_a_bit_probe_quantizes_that_layer_per_channel_and_nothing_else(images):
    model = convnet()
    before = state(model)
    changed = with_bits(model, "block1.0", 2)
    w = changed.get_submodule("block1.0").weight
    levels = [len(torch.unique(w[c])) for c in range(w.shape[0])]
    assert max(levels) <= 3 and min(levels) >= 2  # symmetric 2-bit: codes -1, 0, 1 times a per-channel step
    assert not torch.equal(w, model.get_submodule("block1.0").weight)
    assert same_state(state(changed), before, but="block1.0.weight")
    assert same_state(state(model), before)


def test_an_unstructured_probe_zeroes_exactly_round_r_n_lowest_weights_of_that_layer_only():
    model = convnet()
    before = state(model)
    original = model.get_submodule("block1.0").weight.detach()
    assert int((original == 0).sum()) == 0
    changed = with_zeros(model, "block1.0", 0.3)
    w = changed.get_submodule("block1.0").weight
    zeroed = w == 0
    assert int(zeroed.sum()) == round(0.3 * w.numel()) == 1382
    assert float(original[zeroed].abs().max()) <= float(original[~zeroed].abs().min())  # the lowest |w| went
    assert torch.equal(w[~zeroed], original[~zeroed])
    assert same_state(state(changed), before, but="block1.0.weight")
    assert same_state(state(model), before)


def test_a_structured_probe_cuts_the_coupled_residual_group_of_a_torchvision_resnet(images):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # no weights file: any nn.Module
    before = state(model)
    # layer1.0.conv2 feeds the residual stream: the stem, every layer1 block's output and the
    # next stage's inputs (its first conv and its shortcut) must lose the same 32 channels
    cut = without_channels(model, "layer1.0.conv2", 0.5, images[:1])
    assert cut.conv1.out_channels == cut.bn1.num_features == 32
    assert cut.layer1[0].conv2.out_channels == cut.layer1[1].conv2.out_channels == 32
    assert cut.layer1[0].conv1.out_channels == 64  # inside a block: not coupled
    assert cut.layer2[0].conv1.in_channels == cut.layer2[0].downsample[0].in_channels == 32
    with torch.no_grad():
        assert cut(images[:4]).shape == (4, 10)
    assert model.conv1.out_channels == 64 and same_state(state(model), before)

    batches = own_labels(model, images[:16])
    rows = probe_layer(model, "fc", [Setting("structured", 0.5)], batches)
    assert rows[0]["accuracy"] is None and "classifier" in rows[0]["skipped_reason"]
    (row,) = probe_layer(model, "layer1.0.conv2", [Setting("structured", 0.5)], batches)
    assert row["skipped_reason"] == "" and row["model_params"] < sum(p.numel() for p in model.parameters())
    assert same_state(state(model), before)


def test_every_probe_with_bn_recalibration_leaves_the_model_untouched(images):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 0.25).eval()
    before = state(model)
    batches = own_labels(model, images[:64])
    settings = SensitivityConfig(teacher="t", data="d", out="o", bits="2", rates="0.5").settings()
    assert [s.label for s in settings] == ["2-bit", "u0.5", "s0.5"]
    names = layer_names(model)
    for name in (names[0], names[3]):
        rows = probe_layer(model, name, settings, batches, recalib=batches)
        assert [r["kind"] for r in rows] == ["bits", "unstructured", "structured"]
        assert all(r["skipped_reason"] == "" and 0.0 <= r["accuracy"] <= 1.0 for r in rows), rows
    assert not model.training and same_state(state(model), before)
    # re-estimating BN statistics alone changes the scores a copy gives, never the model's
    recal = probe_layer(model, names[3], [Setting("bits", 8)], batches, recalib=batches)[0]
    plain = probe_layer(model, names[3], [Setting("bits", 8)], batches)[0]
    assert recal["loss"] != plain["loss"] and same_state(state(model), before)


def test_settings_parse_sorted_and_deduplicated():
    cfg = validated(SensitivityConfig(teacher="t", data="d", out="o", bits="8, 2,4,2", rates="0.5,0.25", kinds=""))
    assert [(s.kind, s.value) for s in cfg.settings()] == [("bits", 2.0), ("bits", 4.0), ("bits", 8.0)]
    cfg = validated(SensitivityConfig(teacher="t", data="d", out="o", bits="", kinds="structured", rates="0.5"))
    assert [s.label for s in cfg.settings()] == ["s0.5"]
    assert Setting("bits", 4.0).label == "4-bit"


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("bits", "1,4", "--bits"),
        ("bits", "9", "--bits"),
        ("bits", "four", "--bits"),
        ("rates", "0,0.5", "--rates"),
        ("rates", "1.0", "--rates"),
        ("kinds", "unstructured,channels", "--kinds"),
        ("calib_images", 0, "--calib-images"),
        ("bn_batches", 0, "--bn-batches"),
        ("cpus_per_task", 0, "--cpus-per-task"),
        ("teacher", "", "--teacher"),
    ],
)
def test_bad_settings_fail_in_one_line(field, value, flag):
    with pytest.raises(EffrayError) as err:
        validated(SensitivityConfig(**{"teacher": "t", "data": "d", "out": "o", field: value}))
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_a_bad_flag_in_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--dry-run", "sensitivity", "--teacher", "t", "--data", "d", "--out", str(out), "--rates", "0.5,2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("effray: error: --rates must be") and err.count("\n") == 1
    assert not out.exists()


def test_nothing_to_probe_fails_in_one_line():
    with pytest.raises(EffrayError, match="nothing to probe"):
        validated(SensitivityConfig(teacher="t", data="d", out="o", bits="", kinds=""))
    with pytest.raises(EffrayError, match="needs at least one --rates"):
        validated(SensitivityConfig(teacher="t", data="d", out="o", bits="", rates=""))
