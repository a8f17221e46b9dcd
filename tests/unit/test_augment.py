"""Augmentation: the op contract for every registered op (through Ray Data's numpy edge
and on tensors), what each op does, determinism, and policy parsing. The fake-CUDA
placement of every op is in tests/fake_cuda/test_device_discipline.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effray.data import augment_image
from effray.data.augment import augment_arrays, batch_generator, parse_policy, torch_threads
from effray.data.augment_auto import AUTO_MAGNITUDES, SUB_OPS, apply_sub_ops, auto_values
from effray.data.augment_image import adjust_colour, rotation, warp, warp_nearest
from effray.data.augment_ops import crop, paste_box
from effray.data.augment_spec import OPS, PRESETS, parse_ops
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


def arrays_apply(text: str, batch: dict, seed: int = 0, num_classes: int = 10, epoch: int = 0) -> dict:
    """Ray Data's path: numpy columns in, numpy out."""
    return augment_arrays(batch, parse_policy(text, num_classes), gen(seed), seed=seed, epoch=epoch)


def tensors_apply(text: str, batch: dict, seed: int = 0, num_classes: int = 10, epoch: int = 0) -> dict:
    """The policy on CPU tensors (a search trial's epochs; the device path on the CPU)."""
    out = parse_policy(text, num_classes)(to_torch(batch), gen(seed), seed=seed, epoch=epoch)
    return {k: v.numpy() for k, v in out.items()}


ENTRIES = [("arrays", arrays_apply), ("tensors", tensors_apply)]
apply = arrays_apply


# ------------------------------------------------------------------ contract, every op


@pytest.mark.parametrize(("entry", "run"), ENTRIES)
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_contract(name: str, channels: int, entry: str, run) -> None:
    batch = make_batch(n=32, c=channels)
    before = {k: v.copy() for k, v in batch.items()}
    for v in batch.values():  # Ray hands out read-only, zero-copy arrays
        v.flags.writeable = False
    out = run(name, batch, seed=1)

    for k, v in batch.items():  # input untouched
        np.testing.assert_array_equal(v, before[k])
    assert isinstance(out["image"], np.ndarray)
    assert out["image"].dtype == np.uint8 and out["image"].shape == expected_shape(name, batch["image"].shape)
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

    again = run(name, batch, seed=1)  # same seed -> identical output
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    if name == "grayscale" and channels == 1:
        np.testing.assert_array_equal(out["image"], batch["image"])  # already gray
        return
    if not OPS.get(name).random:  # resize, center_crop: a model's preprocessing draws nothing
        np.testing.assert_array_equal(run(name, batch, seed=2)["image"], out["image"])
        return
    other = run(name, batch, seed=2)
    assert not np.array_equal(other["image"], out["image"]), "a new seed must change the output"


def expected_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The NHWC shape op ``name`` (its default parameters) makes of ``shape``."""
    ((_, params),) = parse_ops(name)
    return (shape[0], *OPS.get(name).output_size(params, *shape[1:3]), shape[3])


@pytest.mark.parametrize(("entry", "run"), ENTRIES)
def test_every_op_takes_empty_and_odd_shaped_batches(entry: str, run) -> None:
    for batch in (make_batch(n=0), make_batch(n=3, h=7, w=13, c=1)):
        for name in ALL_OPS:
            assert run(name, batch)["image"].shape == expected_shape(name, batch["image"].shape), name


def test_the_numpy_edge_hands_untouched_columns_back_and_holds_torch_to_the_task_s_threads() -> None:
    batch = make_batch(n=8)
    batch["name"] = np.array([f"row{i}" for i in range(8)])  # a column no op reads passes through as is
    out = augment_arrays(batch, parse_policy("cutout(4)", 10), gen(), threads=1)
    assert out["label"] is batch["label"] and out["name"] is batch["name"]
    assert not np.shares_memory(out["image"], batch["image"])
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_batch_generator_epochs_give_fresh_but_reproducible_randomness() -> None:
    batch, pol = to_torch(make_batch()), parse_policy("strong", 10)
    a = pol(batch, batch_generator(0, 0, 100))["image"]
    assert torch.equal(a, pol(batch, batch_generator(0, 0, 100))["image"])
    assert not torch.equal(a, pol(batch, batch_generator(0, 1, 100))["image"])
    assert not torch.equal(a, pol(batch, batch_generator(0, 0, 116))["image"])
    assert not torch.equal(a, pol(batch, batch_generator(1, 0, 100))["image"])


# ------------------------------------------------------------------ what each op does


def test_flip_mirrors_exactly() -> None:
    b = make_batch()
    np.testing.assert_array_equal(apply("flip(1)", b)["image"], b["image"][:, :, ::-1])
    np.testing.assert_array_equal(apply("flip(p=0)", b)["image"], b["image"])


def test_crop_is_a_shifted_copy_of_the_reflect_padded_image() -> None:
    b, p = make_batch(n=8), 3
    out = apply(f"crop({p})", b)["image"]
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


def test_cutout_zeroes_one_clipped_square() -> None:
    b = make_batch(n=64, h=24, w=24)
    b["image"] = np.maximum(b["image"], 1)  # so only cutout makes zeros
    zero = (apply("cutout(size=6)", b)["image"] == 0).all(-1)
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


def test_grayscale_gives_equal_channels() -> None:
    b = make_batch()
    out = apply("grayscale(1.0)", b)["image"].astype(int)
    assert (out == out[..., :1]).all()
    luma = b["image"].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(out[..., 0] - luma).max() <= 0.51


@pytest.mark.parametrize(
    "text",
    [
        "rotate(0)",
        "rotate(0,1)",
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
def test_zero_strength_is_identity(text: str) -> None:
    b = make_batch()
    np.testing.assert_array_equal(apply(text, b)["image"], b["image"])


def two_class_batch(n: int = 64) -> dict[str, np.ndarray]:
    """Class-0 images are all 0, class-1 images all 200: a pixel tells how much of each it holds."""
    label = np.arange(n) % 2
    return {
        "image": np.broadcast_to((label * 200).astype(np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy(),
        "label": label.astype(np.int64),
        "index": np.arange(n),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_and_cutmix_targets_match_the_pixels(seed: int) -> None:
    b = two_class_batch()
    mix = apply("mixup(alpha=1.0)", b, seed=seed, num_classes=2)
    share = mix["image"].astype(np.float64).mean(axis=(1, 2, 3)) / 200
    np.testing.assert_allclose(mix["target"][:, 1], share, atol=0.5 / 200 + 1e-6)
    assert 0 < np.abs(mix["target"] - np.eye(2)[b["label"]]).max()
    cut = apply("cutmix(1.0)", b, seed=seed, num_classes=2)
    np.testing.assert_allclose(cut["target"][:, 1], (cut["image"] == 200).mean(axis=(1, 2, 3)), atol=1e-6)
    both = apply("mixup(1.0)|cutmix(1.0)", b, seed=seed, num_classes=2)  # a mix of a mix
    np.testing.assert_allclose(both["target"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(both["target"][:, 1], both["image"].mean(axis=(1, 2, 3)) / 200, atol=0.5 / 200 + 1e-6)


@pytest.mark.parametrize("text", ["mixup(0.2)", "mixup(2.0)", "cutmix(1.0)"])
def test_mixing_ratios_follow_beta(text: str) -> None:
    """The on-device Beta draw (two Marsaglia-Tsang Gammas, no host read) keeps, per batch,
    the share the same mix with numpy's Beta(alpha, alpha) keeps: the batch's mean of each
    row's largest target (a row paired with itself keeps 1; cutmix's lam is its clipped box)."""
    b = {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.array([0, 1, 2, 3])}
    pol, tb = parse_policy(text, 4), to_torch(b)
    kept = np.array([pol(tb, gen(s))["target"].amax(1).mean().item() for s in range(300)])
    alpha, rng, ref = float(text.split("(")[1].rstrip(")")), np.random.default_rng(0), []
    for _ in range(3000):
        lam, perm = rng.beta(alpha, alpha), rng.permutation(4)
        if text.startswith("cutmix"):  # the pasted box: floor(8 sqrt(1-lam)) a side, centred anywhere, clipped
            side = int(8 * np.sqrt(1 - lam))
            (y0, y1), (x0, x1) = (np.clip([c - side // 2, c - side // 2 + side], 0, 8) for c in rng.integers(0, 8, 2))
            lam = 1 - (y1 - y0) * (x1 - x0) / 64
        ref.append((lam * np.eye(4) + (1 - lam) * np.eye(4)[perm]).max(1).mean())
    assert abs(kept.mean() - np.mean(ref)) < 0.04 and abs(kept.std() - np.std(ref)) < 0.04


def test_cutmix_pastes_alike_by_slices_on_the_host_and_by_a_select_on_a_device() -> None:
    x = torch.from_numpy(make_batch(n=16, h=12, w=10)["image"])
    perm = torch.randperm(16, generator=gen())
    ys, xs = torch.arange(12).view(-1, 1), torch.arange(10).view(1, -1)
    for top, bottom, left, right in ((2, 7, 3, 10), (0, 12, 0, 10), (4, 4, 1, 5)):
        box = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)
        corners = tuple(torch.tensor(c) for c in (top, bottom, left, right))
        sliced = paste_box(x, perm, box, corners, by_slices=True)
        assert torch.equal(sliced, paste_box(x, perm, box, corners, by_slices=False))
        assert torch.equal(sliced[:, top:bottom, left:right], x[perm, top:bottom, left:right])


def test_mixing_rejects_labels_outside_num_classes() -> None:
    with pytest.raises(EffrayError, match="labels must be in"):
        apply("mixup", make_batch(), num_classes=3)


def test_crop_padding_must_fit_the_image() -> None:
    with pytest.raises(EffrayError, match="needs images larger"):
        apply("crop(12)", make_batch())


def test_warp_geometry_matches_exact_rotations_and_shifts() -> None:
    x = torch.from_numpy(make_batch(n=4)["image"])
    np.testing.assert_array_equal(SUB_OPS["rotate"](x, torch.full((4,), 90.0)), np.rot90(x.numpy(), 1, axes=(1, 2)))
    shifted = SUB_OPS["translate_x"](x, torch.full((4,), 3 / 12)).numpy()
    np.testing.assert_array_equal(shifted[:, :, 3:], x.numpy()[:, :, :-3])
    assert (shifted[:, :, :3] == 0).all()


def test_nearest_warp_indexes_in_int64_and_float64_past_int32_and_float32_range(monkeypatch) -> None:
    """Batches with 2**31 pixels or more switch the gather index to int64 (2**24: the
    float count to float64), same result."""
    from effray.data.augment_image import nearest_source_index

    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    mats = rotation(torch.tensor([-30.0, -7.5, 0.0, 3.0, 45.0, 170.0]), 16, 16)
    small = warp_nearest(x, mats)
    assert nearest_source_index(mats, 6, 16, 16).dtype == torch.int32
    monkeypatch.setattr(augment_image, "INT32_INDEX_LIMIT", 100)
    monkeypatch.setattr(augment_image, "FLOAT32_EXACT_LIMIT", 100)
    assert nearest_source_index(mats, 6, 16, 16).dtype == torch.int64
    assert torch.equal(warp_nearest(x, mats), small)


def test_rotate_is_nearest_neighbour_as_torchvision_unless_bilinear() -> None:
    """rotate's default copies pixels (torchvision's RandomRotation default); rotate(d,1)
    interpolates. Both rotate by U(-d, d) with zero fill."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    xn = (np.random.default_rng(0).beta(2, 5, (4, 16, 16, 3)) * 220).astype(np.uint8)
    x = torch.from_numpy(xn)
    near = warp_nearest(x, rotation(torch.full((4,), 20.0), 16, 16)).numpy()
    ref = tvf.rotate(x.permute(0, 3, 1, 2), 20.0, tvf.InterpolationMode.NEAREST).permute(0, 2, 3, 1).numpy()
    assert (near == ref).all(axis=-1).mean() > 0.97  # the rest: ties in rounding a coordinate
    same_pixel = (near[..., None, None, :] == xn[:, None, None]).all(-1).any((-1, -2))  # every pixel is a source pixel
    assert (same_pixel | (near == 0).all(-1)).all()
    assert torch.equal(warp_nearest(x, rotation(torch.zeros(4), 16, 16)), x)
    np.testing.assert_array_equal(
        warp_nearest(x, rotation(torch.full((4,), 90.0), 16, 16)), np.rot90(xn, 1, axes=(1, 2))
    )
    # the op: nearest by default, bilinear on request, the same angle draws either way
    batch = {"image": xn, "label": np.arange(4)}
    a = apply("rotate(30)", batch, seed=5)["image"]
    b = apply("rotate(30,1)", batch, seed=5)["image"]
    assert not np.array_equal(a, b) and np.abs(a.astype(int) - b.astype(int)).mean() < 20  # same angles
    assert not np.array_equal(a, xn)


def test_sub_ops_match_torchvision() -> None:
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.from_numpy((np.random.default_rng(0).beta(2, 5, (4, 16, 16, 3)) * 220).astype(np.uint8))
    t = x.permute(0, 3, 1, 2)
    v = torch.full((4,), 0.2)
    shear = float(np.degrees(np.arctan(0.2)))
    bil = tvf.InterpolationMode.BILINEAR
    ones = torch.ones(4)
    cases = {  # (ours, torchvision, max difference: we round where torchvision truncates)
        "equalize": (SUB_OPS["equalize"](x, v), tvf.equalize(t), 0),
        "posterize": (SUB_OPS["posterize"](x, torch.full((4,), 3.0)), tvf.posterize(t, 5), 0),
        "solarize": (SUB_OPS["solarize"](x, torch.full((4,), 100.0)), tvf.solarize(t, 155), 0),
        "autocontrast": (SUB_OPS["autocontrast"](x, v), tvf.autocontrast(t), 1),
        "sharpness": (SUB_OPS["sharpness"](x, v), tvf.adjust_sharpness(t, 1.2), 1),
        "contrast": (SUB_OPS["contrast"](x, v), tvf.adjust_contrast(t, 1.2), 1),
        "color": (SUB_OPS["color"](x, v), tvf.adjust_saturation(t, 1.2), 1),
        "rotate": (SUB_OPS["rotate"](x, torch.full((4,), 20.0)), tvf.rotate(t, 20.0, interpolation=bil), 1),
        "shear_x": (SUB_OPS["shear_x"](x, v), tvf.affine(t, 0.0, [0, 0], 1.0, [shear, 0.0], bil, center=[0, 0]), 1),
        "shear_y": (SUB_OPS["shear_y"](x, v), tvf.affine(t, 0.0, [0, 0], 1.0, [0.0, shear], bil, center=[0, 0]), 1),
        "hue": (adjust_colour(x, ones, ones, ones, torch.full((4,), 0.1)), tvf.adjust_hue(t, 0.1), 1),
    }
    for name, (ours, ref, tol) in cases.items():
        diff = np.abs(ours.numpy().astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int))
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


def test_sub_ops_grouped_on_the_host_equal_batch_wide_on_a_device() -> None:
    """RandAugment's two ways to give each image its own sub-op (per group on the host, a
    select over every sub-op's whole-batch result on a GPU) give the same pixels."""
    x = torch.from_numpy(make_batch(n=64)["image"])
    for wide in (False, True):
        g = gen(int(wide))
        choice = torch.randint(0, len(AUTO_MAGNITUDES), (64,), generator=g)
        bins = torch.randint(0, 31, (64,), generator=g)
        sign = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
        values = auto_values(choice, bins, sign, wide)
        grouped = apply_sub_ops(x, choice, values, grouped=True)
        assert torch.equal(grouped, apply_sub_ops(x, choice, values, grouped=False))
        assert not torch.equal(grouped, x)


def test_flip_and_grayscale_rates_match_p() -> None:
    b = pattern_batch(n=2000, size=4)
    flipped = apply("flip(0.3)", b)["image"][:, 0, 0, 0] != b["image"][0, 0, 0, 0]
    gray = np.ptp(apply("grayscale(0.7)", b)["image"][:, 0, 3], axis=-1) == 0
    assert abs(flipped.mean() - 0.3) < 0.04 and abs(gray.mean() - 0.7) < 0.04


def pattern_batch(n: int = 1024, size: int = 12) -> dict[str, np.ndarray]:
    """One structured image (gradients, a bright square) repeated."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([x * 255, y * 200 + 30, np.where((abs(x - 0.3) < 0.2) & (abs(y - 0.6) < 0.2), 250, 60)], -1)
    return {
        "image": np.broadcast_to(img.astype(np.uint8), (n, size, size, 3)).copy(),
        "label": np.zeros(n, np.int64),
        "index": np.arange(n, dtype=np.int64),
    }


# ------------------------------------------------------------------ fused pairs


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
        "crop(2)|altflip",
    ],
)
def test_fused_geometric_pairs_equal_the_ops_in_sequence(policy) -> None:
    """crop+flip, crop+altflip and flip+rotate run as one gather; the output must be the
    pair's, pixel for pixel, with the same draws (so later ops see the same generator state)."""
    batch = to_torch(make_batch(n=64, h=32, w=32, seed=11))
    x = batch["image"].clone()
    pol = parse_policy(policy, 10)
    for seed in range(5):
        fused_g, plain_g = gen(seed), gen(seed)
        fused = pol(dict(batch), fused_g, seed=seed, epoch=seed)
        plain = dict(batch)
        for name, params in parse_ops(policy):
            plain = OPS.get(name).fn(plain, plain_g, **dict(params), **pol.extra(name, seed, seed))
        assert torch.equal(fused["image"], plain["image"])
        assert torch.equal(torch.rand(1, generator=fused_g), torch.rand(1, generator=plain_g))  # the same draws
    assert torch.equal(batch["image"], x)  # inputs untouched


def test_crop_gathers_what_fancy_indexing_of_the_reflect_padded_image_gives() -> None:
    x = np.random.default_rng(5).integers(0, 256, (16, 12, 10, 3), dtype=np.uint8)
    out = crop({"image": torch.from_numpy(x)}, gen(2), padding=3)["image"].numpy()
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")
    g = gen(2)
    dy, dx = (torch.randint(0, 7, (16,), generator=g).numpy() for _ in range(2))
    for i in range(16):
        np.testing.assert_array_equal(out[i], padded[i, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10])


def test_bilinear_warp_keeps_a_constant_image_inside_and_fills_outside() -> None:
    x = torch.full((2, 9, 9, 3), 77, dtype=torch.uint8)
    out = warp(x, rotation(torch.tensor([45.0, 45.0]), 9, 9))
    assert out[:, 4, 4].eq(77).all() and out[:, 0, 0].eq(0).all()


# ------------------------------------------------------------------ alternating flip


def test_altflip_mirrors_each_image_on_alternate_epochs() -> None:
    """airbench's alternating flip: a row's first-epoch flip is a bit of (seed, row
    index), whatever batch it lands in, and it flips back and forth from then on."""
    batch = make_batch(n=400)

    def flipped(b: dict, epoch: int, seed: int = 7) -> np.ndarray:
        out = apply("altflip", b, seed=seed, epoch=epoch)["image"]
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
    "flp": "unknown augment op 'flp'; valid: altflip, center_crop, crop, cutmix",
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


@pytest.mark.parametrize("text", list(BAD))
def test_bad_policies_raise_one_line_errors(text: str) -> None:
    with pytest.raises(EffrayError, match=BAD[text]) as e:
        parse_policy(text, 10)
    assert "\n" not in str(e.value)
    name = text.split("(")[0]
    if str(e.value).startswith(f"augment op {name}:"):  # a bad parameter shows the whole signature
        assert str(e.value).endswith(f"; signature: {OPS.get(name).signature()}")


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_must_be_a_positive_int(num_classes) -> None:
    with pytest.raises(EffrayError, match="num_classes"):
        parse_policy("standard", num_classes)


def test_policy_names_bad_images_and_a_generator_on_another_device() -> None:
    batch = to_torch(make_batch())
    with pytest.raises(EffrayError, match="uint8 NHWC"):
        parse_policy("flip", 10)({**batch, "image": batch["image"].float()}, gen())
    with pytest.raises(EffrayError, match="uint8 NHWC"):
        parse_policy("flip", 10)({**batch, "image": make_batch()["image"]}, gen())  # numpy: use augment_arrays
    with pytest.raises(EffrayError, match="create the generator on the images' device"):
        parse_policy("flip", 10)({**batch, "image": batch["image"].to("meta")}, gen())
