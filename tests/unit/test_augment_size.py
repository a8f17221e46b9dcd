"""The ops that change an image's size, held to torchvision's transforms (its box sampling,
its antialiased filter, its centre crop), and a model's input size and preprocessing as a
checkpoint records them. The op contract every op meets is in test_augment.py, the device
placement in tests/fake_cuda."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from effray.data.augment import default_preprocess, input_spec, parse_policy, preprocess, preprocess_image
from effray.data.augment_size import crop_boxes, resample, resize_and_crop
from effray.errors import EffrayError


def images(n: int = 6, h: int = 50, w: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("h", "w", "size"), [(50, 70, 32), (70, 50, 32), (40, 40, 96), (224, 224, 64)])
def test_resize_is_torchvisions_resize_of_the_short_side(h, w, size):
    x = images(h=h, w=w)
    got = preprocess(x, f"resize({size})")
    np.testing.assert_array_equal(nchw(got), TF.resize(nchw(x), size, antialias=True))
    assert preprocess(got, f"resize({size})") is got  # an image already that size comes back as it is


@pytest.mark.parametrize(("h", "w", "size", "width"), [(50, 70, 32, 0), (50, 70, 64, 0), (30, 30, 40, 20)])
def test_center_crop_is_torchvisions_padding_included(h, w, size, width):
    x = images(h=h, w=w)
    got = preprocess(x, f"center_crop({size}, {width})")
    np.testing.assert_array_equal(nchw(got), TF.center_crop(nchw(x), [size, width or size]))


@pytest.mark.parametrize(("h", "w", "size"), [(50, 70, 32), (112, 112, 40), (30, 30, 97)])
def test_each_box_is_resampled_as_torchvisions_resized_crop(h, w, size):
    """The filter: per image, what torchvision's ``resized_crop`` makes of the same box,
    within one grey level (torch's uint8 kernel rounds in fixed point, this in float)."""
    x = images(n=8, h=h, w=w)
    top, left, bh, bw = crop_boxes(torch.Generator().manual_seed(1), 8, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
    got = resample(x, top, left, bh, bw, size, size)
    for i in range(8):
        box = [int(v[i]) for v in (top, left, bh, bw)]
        want = TF.resized_crop(nchw(x[i : i + 1]), *box, [size, size], antialias=True)
        assert (nchw(got[i : i + 1]).int() - want.int()).abs().max() <= 1


@pytest.mark.parametrize(
    ("h", "w", "scale", "ratio"), [(60, 80, (0.08, 1.0), (3 / 4, 4 / 3)), (20, 200, (0.5, 1.0), (1.0, 1.0))]
)
def test_boxes_are_drawn_as_torchvision_draws_them(h, w, scale, ratio):
    """The sampling: 2,000 boxes against torchvision's ``get_params`` (its ten tries, then
    the centre): the same mean area and aspect, the same share of fallbacks (many on a
    20 x 200 strip, whose squares of half its area never fit), every box inside."""
    n = 2000
    top, left, bh, bw = crop_boxes(torch.Generator().manual_seed(0), n, h, w, scale, ratio)
    assert ((top >= 0) & (left >= 0) & (top + bh <= h) & (left + bw <= w) & (bh > 0) & (bw > 0)).all()
    torch.manual_seed(0)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.zeros(1, h, w), list(scale), list(ratio)) for _ in range(n)]
    )
    for ours, theirs in (
        ((bh * bw).float() / (h * w), (ref[:, 2] * ref[:, 3]).float() / (h * w)),
        (bw / bh, ref[:, 3] / ref[:, 2]),
    ):
        assert abs(ours.float().mean() - theirs.float().mean()) < 0.03 * theirs.float().mean()
    fallback = lambda t, lf, hh, ww: ((hh == h) | (ww == w)) & (t == (h - hh) // 2) & (lf == (w - ww) // 2)  # noqa: E731
    ours, theirs = fallback(top, left, bh, bw).float().mean(), fallback(*ref.T).float().mean()
    assert abs(ours - theirs) < 0.03


def test_a_models_preprocessing_and_what_prepare_does_to_each_image():
    x = images(n=1, h=90, w=120)
    chain = default_preprocess([64, 64, 3])
    assert chain == "resize(size=64)|center_crop(size=64, width=0)"
    once = preprocess_image(x[0].numpy(), chain)
    np.testing.assert_array_equal(once, resize_and_crop(x[0].numpy(), 64))
    np.testing.assert_array_equal(
        nchw(torch.from_numpy(once)[None]), TF.center_crop(TF.resize(nchw(x), 64, antialias=True), 64)
    )
    assert parse_policy("random_resized_crop(64)|flip", 10).output_size(90, 120) == (64, 64)
    assert parse_policy("crop(4)|resize(32)", 10).output_size(90, 120) == (32, 42)
    with pytest.raises(EffrayError, match="draws random numbers"):
        preprocess(x, "resize(32)|flip")


def test_the_input_a_checkpoint_records_and_bad_preprocessing_in_one_line():
    assert input_spec([64, 64, 3], "random_resized_crop(48, scale=(0.35, 1))|flip", 10) == {
        "image_shape": [48, 48, 3],
        "preprocess": "resize(size=48)|center_crop(size=48, width=0)",
    }
    assert input_spec([32, 32, 3], "standard", 10)["image_shape"] == [32, 32, 3]
    assert input_spec([64, 64, 3], "random_resized_crop(48)", 10, "resize(55)|center_crop(48)")["preprocess"] == (
        "resize(size=55)|center_crop(size=48, width=0)"
    )
    for bad, why in (
        ("resize(40)", "makes 40x40 of the stored 64x64 images, but --augment makes 48x48"),
        ("flip", "draws random"),
    ):
        with pytest.raises(EffrayError, match=why) as e:
            input_spec([64, 64, 3], "random_resized_crop(48)", 10, bad)
        assert "\n" not in str(e.value)
