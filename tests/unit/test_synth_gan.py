"""The GAN's contract (shapes, conditioning, spectral norm, losses that move the right way)
and the quality metrics' math, on real CIFAR pixels and known Gaussians."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn.utils import parametrize

from effray.synth.gan import (
    Discriminator,
    Generator,
    d_hinge_loss,
    from_uint8,
    g_hinge_loss,
    gan_step,
    generate,
    to_uint8,
)
from effray.synth.quality import (
    diversity_ratio,
    feature_frechet,
    frechet_distance,
    mean_pairwise_distance,
)


@pytest.fixture(scope="module")
def real_batch(cifar_parquet):
    """32 real CIFAR-10 images, decoded with the project's own decoder, in [-1, 1]."""
    from effray.data.image_bytes import decode_image

    table = pq.ParquetFile(cifar_parquet).read_row_group(0, columns=["image", "label"]).slice(0, 32)
    images = np.stack([decode_image(b, 3) for b in table.column("image").to_pylist()])
    return from_uint8(torch.from_numpy(images)), torch.tensor(table.column("label").to_pylist())


def test_shapes_and_range(one_thread):
    torch.manual_seed(0)
    g, d = Generator(10, z_dim=32, width=16), Discriminator(10, width=16)
    y = torch.arange(6) % 10
    x = g(torch.randn(6, 32), y)
    assert x.shape == (6, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert d(x, y).shape == (6,)
    assert d.features(x).shape == (6, 8 * 16)
    images = generate(g, np.array([0, 1, 2]), np.array([5, 6, 7]), seed=1)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    # a row's image depends on (seed, id, label) only, not on the batch it is in
    again = generate(g, np.array([1]), np.array([6]), seed=1)
    np.testing.assert_array_equal(images[1], again[0])
    u8 = torch.from_numpy(images)
    np.testing.assert_array_equal(to_uint8(from_uint8(u8)), images)


def test_generator_is_class_conditional(one_thread, real_batch):
    torch.manual_seed(0)
    g, d = Generator(10, z_dim=32, width=16), Discriminator(10, width=16)
    z = torch.randn(4, 32)
    g.eval()
    same = [g(z, torch.full((4,), c)) for c in (0, 1)]
    # conditional BN starts class-neutral (gamma 1, beta 0) on purpose: training separates classes
    torch.testing.assert_close(same[0], same[1])
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    for _ in range(3):
        gan_step(g, d, opt_g, opt_d, *real_batch, 32, 10)
    g.eval()
    a, b = g(z, torch.full((4,), 0)), g(z, torch.full((4,), 1))
    assert (a - b).abs().mean() > 1e-5  # exactly equal before: the label now changes the image


def test_projection_term_depends_on_the_label(one_thread, real_batch):
    torch.manual_seed(0)
    d = Discriminator(10, width=16).eval()
    x = real_batch[0][:4]
    s0, s1 = d(x, torch.zeros(4, dtype=torch.long)), d(x, torch.ones(4, dtype=torch.long))
    assert (s0 - s1).abs().min() > 1e-6
    phi = d.features(x)
    # the difference is exactly the projection term <embed(0) - embed(1), phi(x)>
    expected = (phi * (d.embed.weight[0] - d.embed.weight[1])).sum(1)
    torch.testing.assert_close(s0 - s1, expected, rtol=1e-4, atol=1e-5)


def test_every_discriminator_layer_is_spectrally_normalised(one_thread, real_batch):
    torch.manual_seed(0)
    d = Discriminator(10, width=16)
    layers = [*d.convs, d.linear, d.embed]
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(parametrize.is_parametrized(m) for m in Generator(10, 32, 16).modules())
    d.train()
    with torch.no_grad():
        for _ in range(30):  # power iterations run once per training-mode forward
            d(real_batch[0], real_batch[1])
    for m in (*d.convs, d.linear):
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05


def test_training_steps_move_the_losses_the_right_way(one_thread, real_batch):
    torch.manual_seed(0)
    real, labels = real_batch
    g, d = Generator(10, z_dim=32, width=16), Discriminator(10, width=16)
    opt_g, opt_d = (
        torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999)),
    )
    z, fake_y = torch.randn(32, 32), torch.randint(0, 10, (32,))

    def d_loss() -> float:
        with torch.no_grad():
            return float(d_hinge_loss(d(real, labels), d(g(z, fake_y), fake_y)))

    def g_loss() -> float:
        with torch.no_grad():
            return float(g_hinge_loss(d(g(z, fake_y), fake_y)))

    g.train(), d.train()
    assert abs(d_loss() - 2.0) < 0.5  # scores near 0 at init: hinge ~ 1 + 1
    steps = [tuple(float(t) for t in gan_step(g, d, opt_g, opt_d, real, labels, 32, 10)) for _ in range(8)]
    assert all(np.isfinite(s).all() for s in steps)
    assert steps[-1][0] < steps[0][0] - 0.05  # the critic learns to separate real from fake
    # with the critic fixed, generator steps raise the fakes' scores (lower G loss)
    before = g_loss()
    for _ in range(5):
        loss = g_hinge_loss(d(g(z, fake_y), fake_y))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    assert g_loss() < before
    # with the generator fixed, critic steps lower the critic's loss
    before = d_loss()
    for _ in range(5):
        with torch.no_grad():
            fake = g(z, fake_y)
        loss = d_hinge_loss(d(real, labels), d(fake, fake_y))
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    assert d_loss() < before


def test_frechet_distance_math():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    assert frechet_distance(a.mean(0), np.cov(a, rowvar=False), a.mean(0), np.cov(a, rowvar=False)) == pytest.approx(
        0, abs=1e-6
    )
    assert feature_frechet(a, a.copy()) == pytest.approx(0, abs=1e-6)
    # N(0, I) vs N(m, 4I) in d dims: |m|^2 + d (1 + 4 - 2 * 2)
    d, m = 4, np.array([1.0, 2.0, 0.0, -1.0])
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(m @ m + d)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    s1, s2 = np.diag([1.0, 9.0]), np.diag([4.0, 1.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx((1 - 2) ** 2 + (3 - 1) ** 2)
    # from samples: close to the closed form
    x = rng.normal(size=(20000, d))
    y = m + 2 * rng.normal(size=(20000, d))
    assert feature_frechet(x, y) == pytest.approx(m @ m + d, rel=0.05)


def test_diversity_math():
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 8))
    labels = np.arange(200) % 4
    ratio, per = diversity_ratio(0.5 * real, labels, real, labels, 4)
    assert ratio == pytest.approx(0.5) and all(p == pytest.approx(0.5) for p in per)
    collapsed = np.repeat(real[:1], 200, axis=0)  # one image for everything: zero diversity
    assert diversity_ratio(collapsed, labels, real, labels, 4)[0] == pytest.approx(0.0)
