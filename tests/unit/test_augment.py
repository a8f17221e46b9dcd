"""Augmentation: the op contract for every registered op (numpy and torch), what each op
does, determinism, policy parsing, and numpy/torch agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effray.data import augment_torch as T
from effray.data.augment import AUTO_MAGNITUDES, PRESETS, SUB_OPS, batch_rng, normalize, parse_ops, parse_policy
from effray.data.augment_ops import OPS, adjust_colour, crop
from effray.errors import EffrayError

ALL_OPS = OPS.names()


def make_batch(n: int = 16, h: int = 12, w: int = 12, c: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, h, w, c), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int64),
        "index": np.arange(100, 100 + n, dtype=np.int64),
        "synthetic": np.zeros(n, dtype=bool),
    }


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in batch.items()}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def np_apply(text: str, batch: dict, seed: int = 0, num_classes: int = 10) -> dict:
    return parse_policy(text, num_classes)(batch, np.random.default_rng(seed), seed=seed)


def t_apply(text: str, batch: dict, seed: int = 0, num_classes: int = 10) -> dict:
    return T.parse_policy_torch(text, num_classes)(to_torch(batch), gen(seed), seed=seed)


def as_np(out: dict) -> dict[str, np.ndarray]:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# ------------------------------------------------------------------ contract, every op


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_contract(name: str, channels: int, backend: str) -> None:
    apply = np_apply if backend == "numpy" else t_apply
    batch = make_batch(n=32, c=channels)
    before = {k: v.copy() for k, v in batch.items()}
    for v in batch.values():  # Ray hands out read-only, zero-copy arrays
        v.flags.writeable = False
    out = as_np(apply(name, batch, seed=1))

    for k, v in batch.items():  # input untouched
        np.testing.assert_array_equal(v, before[k])
    assert out["image"].dtype == np.uint8 and out["image"].shape == batch["image"].shape
    for k in ("label", "index", "synthetic"):  # passthrough columns unchanged
        assert out[k].dtype == batch[k].dtype
        np.testing.assert_array_equal(out[k], batch[k])
    if OPS.get(name).mixes_labels:
        t = out["target"]
        assert t.dtype == np.float32 and t.shape == (32, 10)
        assert t.min() >= 0 and t.max() <= 1
        np.testing.assert_allclose(t.sum(1), 1, atol=1e-5)
    else:
        assert set(out) == set(batch)

    again = as_np(apply(name, batch, seed=1))  # same seed -> identical output
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    if name == "grayscale" and channels == 1:
        np.testing.assert_array_equal(out["image"], batch["image"])  # already gray
        return
    other = as_np(apply(name, batch, seed=2))
    assert not np.array_equal(other["image"], out["image"]), "a new seed must change the output"


@pytest.mark.parametrize(("backend", "apply"), [("numpy", np_apply), ("torch", t_apply)])
def test_every_op_takes_empty_and_odd_shaped_batches(backend: str, apply) -> None:
    for batch in (make_batch(n=0), make_batch(n=3, h=7, w=13, c=1)):
        for name in ALL_OPS:
            assert as_np(apply(name, batch))["image"].shape == batch["image"].shape, name


def test_every_op_has_a_torch_version() -> None:
    assert sorted(T.TORCH_OPS) == ALL_OPS


def test_batch_rng_epochs_give_fresh_but_reproducible_randomness() -> None:
    batch, pol = make_batch(), parse_policy("strong", 10)
    a = pol(batch, batch_rng(0, 0, 100))["image"]
    np.testing.assert_array_equal(a, pol(batch, batch_rng(0, 0, 100))["image"])
    assert not np.array_equal(a, pol(batch, batch_rng(0, 1, 100))["image"])
    assert not np.array_equal(a, pol(batch, batch_rng(0, 0, 116))["image"])
    assert not np.array_equal(a, pol(batch, batch_rng(1, 0, 100))["image"])
    g0, g1 = T.batch_generator(0, 0, 100), T.batch_generator(0, 1, 100)
    assert torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=T.batch_generator(0, 0, 100)))
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=T.batch_generator(0, 0, 100)))


# ------------------------------------------------------------------ what each op does

BACKENDS = [("numpy", np_apply), ("torch", t_apply)]


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
def test_flip_mirrors_exactly(backend: str, apply) -> None:
    b = make_batch()
    np.testing.assert_array_equal(as_np(apply("flip(1)", b))["image"], b["image"][:, :, ::-1])
    np.testing.assert_array_equal(as_np(apply("flip(p=0)", b))["image"], b["image"])


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
def test_crop_is_a_shifted_copy_of_the_reflect_padded_image(backend: str, apply) -> None:
    b, p = make_batch(n=8), 3
    out = as_np(apply(f"crop({p})", b))["image"]
    padded = np.pad(b["image"], ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    shifts = []
    for i in range(len(out)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, dy : dy + 12, dx : dx + 12])
        ]
        assert hits, f"image {i} is not a window of the padded image"
        shifts.append(hits[0])
    assert len(set(shifts)) > 1


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
def test_cutout_zeroes_one_clipped_square(backend: str, apply) -> None:
    b = make_batch(n=64, h=24, w=24)
    b["image"] = np.maximum(b["image"], 1)  # so only cutout makes zeros
    zero = (as_np(apply("cutout(size=6)", b))["image"] == 0).all(-1)
    full = 0
    for m in zero:
        rows, cols = m.any(1), m.any(0)
        assert rows.any(), "the centre is inside the image, so something is cut"
        np.testing.assert_array_equal(m, np.outer(rows, cols))  # exactly one rectangle
        assert np.ptp(np.flatnonzero(rows)) < 6 and np.ptp(np.flatnonzero(cols)) < 6
        full += int(m.sum() == 36)
        if (
            0 < np.flatnonzero(rows)[0]
            and np.flatnonzero(rows)[-1] < 23
            and 0 < np.flatnonzero(cols)[0]
            and np.flatnonzero(cols)[-1] < 23
        ):
            assert m.sum() == 36  # away from the borders it is the whole square
    assert full > 10


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
def test_grayscale_gives_equal_channels(backend: str, apply) -> None:
    b = make_batch()
    out = as_np(apply("grayscale(1.0)", b))["image"].astype(int)
    assert (out == out[..., :1]).all()
    luma = b["image"].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(out[..., 0] - luma).max() <= 0.51


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
@pytest.mark.parametrize(
    "text",
    [
        "rotate(0)",
        "jitter(0,0,0,0)",
        "noise(0)",
        "cutout(0)",
        "crop(0)",
        "scale(1,1)",
        "resized_crop(1.0,1.0,(1,1))",
        "grayscale(0)",
        "randaugment(0)",
    ],
)
def test_zero_strength_is_identity(text: str, backend: str, apply) -> None:
    b = make_batch()
    np.testing.assert_array_equal(as_np(apply(text, b))["image"], b["image"])


def two_class_batch(n: int = 64) -> dict[str, np.ndarray]:
    """Class-0 images are all 0, class-1 images all 200: a pixel tells how much of each it holds."""
    label = np.arange(n) % 2
    return {
        "image": np.broadcast_to((label * 200).astype(np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy(),
        "label": label.astype(np.int64),
        "index": np.arange(n),
    }


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_and_cutmix_targets_match_the_pixels(seed: int, backend: str, apply) -> None:
    b = two_class_batch()
    mix = as_np(apply("mixup(alpha=1.0)", b, seed=seed, num_classes=2))
    share = mix["image"].astype(np.float64).mean(axis=(1, 2, 3)) / 200
    np.testing.assert_allclose(mix["target"][:, 1], share, atol=0.5 / 200 + 1e-6)
    assert 0 < np.abs(mix["target"] - np.eye(2)[b["label"]]).max()
    cut = as_np(apply("cutmix(1.0)", b, seed=seed, num_classes=2))
    np.testing.assert_allclose(cut["target"][:, 1], (cut["image"] == 200).mean(axis=(1, 2, 3)), atol=1e-6)
    both = as_np(apply("mixup(1.0)|cutmix(1.0)", b, seed=seed, num_classes=2))  # a mix of a mix
    np.testing.assert_allclose(both["target"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(both["target"][:, 1], both["image"].mean(axis=(1, 2, 3)) / 200, atol=0.5 / 200 + 1e-6)


def test_mixing_rejects_labels_outside_num_classes() -> None:
    with pytest.raises(EffrayError, match="labels must be in"):
        np_apply("mixup", make_batch(), num_classes=3)


def test_crop_padding_must_fit_the_image() -> None:
    with pytest.raises(EffrayError, match="needs images larger"):
        np_apply("crop(12)", make_batch())


def test_warp_geometry_matches_exact_rotations_and_shifts() -> None:
    x = make_batch(n=4)["image"]
    np.testing.assert_array_equal(SUB_OPS["rotate"](x, np.full(4, 90.0)), np.rot90(x, 1, axes=(1, 2)))
    shifted = SUB_OPS["translate_x"](x, np.full(4, 3 / 12))
    np.testing.assert_array_equal(shifted[:, :, 3:], x[:, :, :-3])
    assert (shifted[:, :, :3] == 0).all()


def test_nearest_warp_indexes_in_int64_past_int32_range(monkeypatch) -> None:
    """Batches with 2**31 pixels or more switch the gather index to int64, same result."""
    from effray.data import augment_ops
    from effray.data.augment_ops import _rotation, _warp_nearest

    x = np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    mats = _rotation(np.array([-30.0, -7.5, 0.0, 3.0, 45.0, 170.0]), 16, 16)
    small = _warp_nearest(x, mats)
    assert augment_ops._nearest_source_index(mats, 6, 16, 16).dtype == np.int32
    monkeypatch.setattr(augment_ops, "INT32_INDEX_LIMIT", 100)
    assert augment_ops._nearest_source_index(mats, 6, 16, 16).dtype == np.int64
    np.testing.assert_array_equal(_warp_nearest(x, mats), small)


def test_rotate_is_nearest_neighbour_as_torchvision_unless_bilinear() -> None:
    """rotate's default copies pixels (torchvision's RandomRotation default); rotate(d,1)
    interpolates. Both rotate by U(-d, d) with zero fill, and numpy and torch agree."""
    from effray.data.augment_ops import _rotation, _warp_nearest
    from effray.data.augment_torch import _warp as t_warp

    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = (np.random.default_rng(0).beta(2, 5, (4, 16, 16, 3)) * 220).astype(np.uint8)
    mats = _rotation(np.full(4, 20.0), 16, 16)
    near = _warp_nearest(x, mats)
    ref = (
        tvf.rotate(torch.from_numpy(x).permute(0, 3, 1, 2), 20.0, tvf.InterpolationMode.NEAREST)
        .permute(0, 2, 3, 1)
        .numpy()
    )
    assert (near == ref).all(axis=-1).mean() > 0.97  # the rest: ties in rounding a coordinate
    same_pixel = (near[..., None, None, :] == x[:, None, None]).all(-1).any((-1, -2))  # every pixel is a source pixel
    assert (same_pixel | (near == 0).all(-1)).all()
    t_near = t_warp(torch.from_numpy(x), torch.from_numpy(mats).float(), mode="nearest").numpy()
    assert (near == t_near).all(axis=-1).mean() > 0.97
    np.testing.assert_array_equal(_warp_nearest(x, _rotation(np.zeros(4), 16, 16)), x)
    np.testing.assert_array_equal(_warp_nearest(x, _rotation(np.full(4, 90.0), 16, 16)), np.rot90(x, 1, axes=(1, 2)))
    # the op: nearest by default, bilinear on request, the same angle draws either way
    batch = {"image": x, "label": np.arange(4)}
    a = np_apply("rotate(30)", batch, seed=5)["image"]
    b = np_apply("rotate(30,1)", batch, seed=5)["image"]
    assert not np.array_equal(a, b) and np.abs(a.astype(int) - b.astype(int)).mean() < 20  # same angles
    assert not np.array_equal(a, x)


def test_sub_ops_match_torchvision() -> None:
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = (np.random.default_rng(0).beta(2, 5, (4, 16, 16, 3)) * 220).astype(np.uint8)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    v = np.full(4, 0.2)
    shear = float(np.degrees(np.arctan(0.2)))
    bil = tvf.InterpolationMode.BILINEAR
    cases = {  # (ours, torchvision, max difference: we round where torchvision truncates)
        "equalize": (SUB_OPS["equalize"](x, v), tvf.equalize(t), 0),
        "posterize": (SUB_OPS["posterize"](x, np.full(4, 3.0)), tvf.posterize(t, 5), 0),
        "solarize": (SUB_OPS["solarize"](x, np.full(4, 100.0)), tvf.solarize(t, 155), 0),
        "autocontrast": (SUB_OPS["autocontrast"](x, v), tvf.autocontrast(t), 1),
        "sharpness": (SUB_OPS["sharpness"](x, v), tvf.adjust_sharpness(t, 1.2), 1),
        "contrast": (SUB_OPS["contrast"](x, v), tvf.adjust_contrast(t, 1.2), 1),
        "color": (SUB_OPS["color"](x, v), tvf.adjust_saturation(t, 1.2), 1),
        "rotate": (
            SUB_OPS["rotate"](x, np.full(4, 20.0)),
            tvf.rotate(t, 20.0, interpolation=bil),
            1,
        ),
        "shear_x": (
            SUB_OPS["shear_x"](x, v),
            tvf.affine(t, 0.0, [0, 0], 1.0, [shear, 0.0], bil, center=[0, 0]),
            1,
        ),
        "shear_y": (
            SUB_OPS["shear_y"](x, v),
            tvf.affine(t, 0.0, [0, 0], 1.0, [0.0, shear], bil, center=[0, 0]),
            1,
        ),
        "hue": (adjust_colour(x, *np.ones((3, 4)), np.full(4, 0.1)), tvf.adjust_hue(t, 0.1), 1),
    }
    for name, (ours, ref, tol) in cases.items():
        diff = np.abs(ours.astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int))
        assert diff.max() <= tol, name


def test_auto_magnitudes_match_torchvision() -> None:
    tvt = pytest.importorskip("torchvision.transforms")
    ra = getattr(tvt.RandAugment(), "_augmentation_space", None)
    ta = getattr(tvt.TrivialAugmentWide(), "_augmentation_space", None)
    if ra is None or ta is None:
        pytest.skip("torchvision changed its private augmentation space")
    ours = {k.replace("_", ""): v for k, v in AUTO_MAGNITUDES.items()}
    for wide, space in ((0, ra(31, (32, 32))), (1, ta(31))):
        assert sorted(ours) == sorted(k.lower() for k in space)
        for name, (mags, signed) in space.items():
            mx, sgn = ours[name.lower()][wide], ours[name.lower()][2]
            assert sgn == signed, name
            if mags.ndim == 0:
                continue
            bins = np.arange(31) / 30 * mx  # our value per magnitude bin
            if name == "Posterize":
                bins = 8 - np.rint(bins)
            elif name == "Solarize":
                bins = 255 - bins
            elif name.startswith("Translate"):
                bins = bins * 32
            np.testing.assert_allclose(bins, mags.numpy(), atol=1e-4, err_msg=name)


# ------------------------------------------------------------------ parsing


def test_presets_and_canonical_text() -> None:
    assert parse_policy("none", 10).is_identity and str(parse_policy("none", 10)) == "none"
    std = parse_policy("standard", 10)
    assert std.ops == [("crop", {"padding": 4}), ("flip", {"p": 0.5})]
    assert str(std) == "crop(padding=4)|flip(p=0.5)" and not std.mixes_labels
    assert [n for n, _ in parse_policy("strong", 10).ops] == [
        "crop",
        "flip",
        "randaugment",
        "cutout",
    ]
    assert parse_policy(" standard | cutout(8) ", 10).ops == parse_policy("crop(4)|flip|cutout(size=8)", 10).ops
    for text in [
        *PRESETS,
        "jitter(0.4,0.4,0.4,0.1)|mixup",
        "resized_crop(ratio=[0.5, 2])|cutmix(0.5)",
    ]:
        pol = parse_policy(text, 10)
        assert parse_policy(str(pol), 10) == pol  # canonical text round-trips


def test_positional_and_keyword_params_agree() -> None:
    assert parse_ops("cutout(8)") == parse_ops("cutout(size=8)")
    assert parse_ops("jitter(0.4,0.4,0.4,0.1)") == parse_ops("jitter") == parse_ops("jitter(0.4, hue=0.1)")
    assert parse_ops("flip(1)") == (("flip", {"p": 1.0}),)  # ints are fine for floats
    assert parse_ops("resized_crop(0.5, ratio=(1, 2))")[0][1] == {
        "min_scale": 0.5,
        "max_scale": 1.0,
        "ratio": (1.0, 2.0),
    }
    assert parse_policy("mixup|crop", 10).mixes_labels


def test_policy_ops_are_copies() -> None:
    pol = parse_policy("cutout(8)", 10)
    pol.ops[0][1]["size"] = 99
    assert pol.ops == [("cutout", {"size": 8})]


BAD = {
    "flp": "unknown augment op 'flp'; valid: altflip, crop, cutmix",
    "standrd|flip": "or a preset: none, standard, strong",
    "crop(4": "cannot parse augment op",
    "crop(*x)": "cannot parse augment op",
    "3": "cannot parse augment op",
    "crop(1, 2)": "crop: takes at most 1 parameters",
    "crop(1.5)": "crop: padding must be int",
    "crop('4')": "crop: padding must be int",
    "flip(True)": "flip: p must be float",
    "flip(1.5)": r"flip: p must be in \[0, 1\]",
    "cutout(-1)": "cutout: size must be in",
    "cutout(sz=8)": "cutout: unknown parameter 'sz'",
    "cutout(8, size=8)": "given twice",
    "cutout(**k)": "kwargs",
    "cutout(3/4)": "must be literal",
    "cutout(x)": "must be literal",
    "scale(1.2, 1.1)": "min must be <= max",
    "resized_crop(ratio=(2, 1))": "ratio must be ordered",
    "resized_crop(ratio=1)": "ratio must be a pair",
    "": "empty augmentation policy",
    "crop||flip": "empty op",
}


@pytest.mark.parametrize("parse", [parse_policy, T.parse_policy_torch])
@pytest.mark.parametrize("text", list(BAD))
def test_bad_policies_raise_one_line_errors(text: str, parse) -> None:
    with pytest.raises(EffrayError, match=BAD[text]) as e:
        parse(text, 10)
    assert "\n" not in str(e.value)
    name = text.split("(")[0]
    if str(e.value).startswith(f"augment op {name}:"):  # a bad parameter shows the whole signature
        assert str(e.value).endswith(f"; signature: {OPS.get(name).signature()}")


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_must_be_a_positive_int(num_classes) -> None:
    with pytest.raises(EffrayError, match="num_classes"):
        parse_policy("standard", num_classes)


def test_torch_policy_names_missing_ops_and_bad_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(T.TORCH_OPS, "rotate")
    with pytest.raises(EffrayError, match="rotate has no torch version; use --augment-on cpu"):
        T.parse_policy_torch("flip|rotate", 10)
    batch = to_torch(make_batch())
    batch["image"] = batch["image"].float()
    with pytest.raises(EffrayError, match="uint8 NHWC"):
        T.parse_policy_torch("flip", 10)(batch, gen())


# ------------------------------------------------------------------ normalize


def test_normalize_both_backends() -> None:
    x = make_batch(n=2)["image"]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = normalize(x, mean, std)
    assert out.dtype == np.float32 and out.shape == (2, 3, 12, 12) and out.flags.c_contiguous
    np.testing.assert_allclose(out[:, 1], (x[..., 1] / 255 - 0.4) / 0.25, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(normalize(x, mean, std, channels_last=True), out.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(T.normalize_torch(torch.from_numpy(x), mean, std).numpy(), out, atol=1e-5)
    gray = normalize(x[..., :1], 0.5, 0.25)
    assert gray.shape == (2, 1, 12, 12)
    with pytest.raises(EffrayError, match="mean has 2 values"):
        normalize(x, [0.5, 0.5], std)
    with pytest.raises(EffrayError, match="std must be > 0"):
        normalize(x, mean, [0.2, 0.0, 0.3])


# ------------------------------------------------------------------ numpy vs torch


@pytest.mark.parametrize("name", list(AUTO_MAGNITUDES))
def test_torch_sub_ops_equal_numpy(name: str) -> None:
    x = make_batch(n=24)["image"]
    mx, signed = max(AUTO_MAGNITUDES[name][:2]), AUTO_MAGNITUDES[name][2]
    v = np.linspace(-mx if signed else 0, mx, 24)
    v = np.rint(v) if name == "posterize" else v
    ours = SUB_OPS[name](x, v).astype(int)
    theirs = T.SUB_OPS[name](torch.from_numpy(x), torch.from_numpy(v).float()).numpy().astype(int)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_torch_colour_equals_numpy() -> None:
    x = make_batch(n=8)["image"]
    f = np.random.default_rng(0).uniform(0.5, 1.5, (3, 8))
    hue = np.linspace(-0.4, 0.4, 8)
    ours = adjust_colour(x, *f, hue).astype(int)
    theirs = T.adjust_colour(torch.from_numpy(x), *map(torch.from_numpy, f), torch.from_numpy(hue)).numpy()
    assert np.abs(ours - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize("text", ["flip(1)", "grayscale(1)", "jitter(0,0,0,0)", "rotate(0)", "scale(1,1)"])
def test_torch_deterministic_ops_equal_numpy(text: str) -> None:
    b = make_batch()
    assert np.abs(np_apply(text, b)["image"].astype(int) - as_np(t_apply(text, b))["image"]).max() <= 1


def pattern_batch(n: int = 1024, size: int = 12) -> dict[str, np.ndarray]:
    """One structured image (gradients, a bright square) repeated: the batch mean shows where
    an op moves content and how often, the batch std how much it varies."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([x * 255, y * 200 + 30, np.where((abs(x - 0.3) < 0.2) & (abs(y - 0.6) < 0.2), 250, 60)], -1)
    return {
        "image": np.broadcast_to(img.astype(np.uint8), (n, size, size, 3)).copy(),
        "label": np.zeros(n, np.int64),
        "index": np.arange(n, dtype=np.int64),
    }


@pytest.mark.parametrize(
    "text",
    [n for n in ALL_OPS if not OPS.get(n).mixes_labels] + ["flip(0.2)", "randaugment(2, 20)"],
)
def test_torch_and_numpy_agree_in_distribution(text: str) -> None:
    # Tolerances: same-op noise stays under ~0.45 of them over many seeds, while e.g. a
    # flip rate of 0.5 vs 0.3 or rotate(10) vs rotate(20) lands well above.
    b = pattern_batch()
    base = b["image"].astype(np.float64)
    a = np_apply(text, b, seed=3)["image"].astype(np.float64)
    t = as_np(t_apply(text, b, seed=4))["image"].astype(np.float64)
    moved = np.abs(a.mean(0) - base.mean(0)).mean()
    assert np.abs(a.mean(0) - t.mean(0)).mean() < 0.25 * moved + 2.5
    assert np.abs(a.std(0) - t.std(0)).mean() < 0.25 * a.std(0).mean() + 2.5


@pytest.mark.parametrize(("backend", "apply"), BACKENDS)
def test_flip_and_grayscale_rates_match_p(backend: str, apply) -> None:
    b = pattern_batch(n=2000, size=4)
    flipped = as_np(apply("flip(0.3)", b))["image"][:, 0, 0, 0] != b["image"][0, 0, 0, 0]
    gray = np.ptp(as_np(apply("grayscale(0.7)", b))["image"][:, 0, 3], axis=-1) == 0
    assert abs(flipped.mean() - 0.3) < 0.04 and abs(gray.mean() - 0.7) < 0.04


@pytest.mark.parametrize("text", ["mixup(0.2)", "mixup(2.0)", "cutmix(1.0)"])
def test_torch_and_numpy_mixing_ratios_agree(text: str) -> None:
    b = {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.array([0, 1, 2, 3])}
    np_pol, t_pol = parse_policy(text, 4), T.parse_policy_torch(text, 4)
    tb = to_torch(b)
    kept = [
        (
            np_pol(b, np.random.default_rng(s))["target"].max(1).mean(),
            t_pol(tb, gen(s))["target"].amax(1).mean().item(),
        )
        for s in range(300)
    ]
    a, t = np.array(kept).T
    assert abs(a.mean() - t.mean()) < 0.04 and abs(a.std() - t.std()) < 0.04


@pytest.mark.parametrize(
    "policy",
    [
        "crop(4)|flip",
        "flip|rotate(10)",
        "flip(0.3)|rotate(30)",
        "crop(2)|flip|rotate(5)",
        "flip|rotate(10,1)",
        "crop(4)|flip(1)",
        "rotate(20)|flip|rotate(20)",
        "standard",
        "flip|flip|rotate(15)",
    ],
)
def test_fused_geometric_pairs_equal_the_ops_in_sequence(policy) -> None:
    """crop+flip and flip+rotate run as one gather; the output must be the pair's, pixel
    for pixel, with the same draws (so later ops in the chain see the same rng state)."""
    from effray.data.augment import parse_ops
    from effray.data.augment_ops import OPS

    x = np.random.default_rng(11).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    batch = {"image": x, "label": np.arange(64) % 10}
    for seed in range(5):
        fused_rng, plain_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        fused = parse_policy(policy, 10)(dict(batch), fused_rng)
        plain = dict(batch)
        for name, params in parse_ops(policy):
            plain = OPS.get(name).fn(plain, plain_rng, **dict(params))
        np.testing.assert_array_equal(fused["image"], plain["image"])
        assert fused_rng.random() == plain_rng.random()  # the same numbers were drawn
    np.testing.assert_array_equal(batch["image"], x)  # inputs untouched


def test_crop_gathers_what_fancy_indexing_of_the_reflect_padded_image_gives() -> None:
    x = np.random.default_rng(5).integers(0, 256, (16, 12, 10, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    out = crop({"image": x}, np.random.default_rng(2), padding=3)["image"]
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")
    dy, dx = (rng.integers(0, 7, 16) for _ in range(2))
    for i in range(16):
        np.testing.assert_array_equal(out[i], padded[i, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10])


# ------------------------------------------------------------------ alternating flip


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_altflip_mirrors_each_image_on_alternate_epochs(backend: str) -> None:
    """airbench's alternating flip: a row's first-epoch flip is a bit of (seed, row
    index), whatever batch it lands in, and it flips back and forth from then on."""
    policy = parse_policy("altflip", 10) if backend == "numpy" else T.parse_policy_torch("altflip", 10)
    batch = make_batch(n=400)

    def flipped(b: dict, epoch: int, seed: int = 7) -> np.ndarray:
        args = (b, np.random.default_rng(epoch)) if backend == "numpy" else (to_torch(b), gen(epoch))
        out = as_np(policy(*args, seed=seed, epoch=epoch))["image"]
        mirror = np.array_equal
        assert all(mirror(o, i) or mirror(o, i[:, ::-1]) for o, i in zip(out, b["image"]))  # whole mirrors only
        return np.array([not np.array_equal(o, i) for o, i in zip(out, b["image"])])

    first = flipped(batch, 0)
    assert 0.4 < first.mean() < 0.6  # a fair coin per image
    for epoch in (1, 2, 3, 6, 9):
        np.testing.assert_array_equal(flipped(batch, epoch), first ^ bool(epoch % 2))
    # in another batch, in another order, a row flips exactly as it did
    order = np.random.default_rng(0).permutation(400)[:150]
    np.testing.assert_array_equal(flipped({k: v[order] for k, v in batch.items()}, 3), ~first[order])
    assert not np.array_equal(flipped(batch, 0, seed=8), first)  # another seed, other first flips
    # synthetic rows number their own indexes: the same index there is another row
    synthetic = {**batch, "synthetic": np.ones(400, dtype=bool)}
    assert not np.array_equal(flipped(synthetic, 0), first)


def test_altflip_is_the_same_on_both_backends() -> None:
    batch = make_batch(n=64)
    for epoch in (0, 1):
        out = np_apply("crop(2)|altflip", batch, seed=3)  # crop draws differ by backend; compare the flip alone
        np.testing.assert_array_equal(
            parse_policy("altflip", 10)(batch, None, seed=3, epoch=epoch)["image"],
            as_np(T.parse_policy_torch("altflip", 10)(to_torch(batch), gen(0), seed=3, epoch=epoch))["image"],
        )
        assert out["image"].shape == batch["image"].shape
