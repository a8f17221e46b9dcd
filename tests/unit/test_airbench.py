"""airbench's recipe pieces: whitening + dirac init, BN-bias lr groups, lookahead, TTA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effray.data.images import sample_images
from effray.models import build_model
from effray.models.airbench import init_from_data, needs_data_init
from effray.models.predict import tta_logits
from effray.train.step import Lookahead, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_images(tiny_cifar):
    """The 540 real CIFAR-10 training rows of the session's dataset, normalised as training sees them."""
    from effray.data.prepare import load_meta

    meta = load_meta(tiny_cifar)
    return tiny_cifar, sample_images(tiny_cifar, 1000, meta["mean"], meta["std"])


def test_sample_images_are_the_first_rows_normalised(real_images):
    data_dir, x = real_images
    assert x.shape == (540, 3, 32, 32)  # asked for more: the split has 540 and x.dtype == torch.float32
    # normalised with the split's own statistics: ~zero mean, ~unit std per channel
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.15
    from effray.data.prepare import load_meta

    meta = load_meta(data_dir)
    assert torch.equal(sample_images(data_dir, 10, meta["mean"], meta["std"]), x[:10])


def test_whitening_stem_decorrelates_real_patches(real_images):
    _, x = real_images
    torch.manual_seed(0)
    model = build_model("airbench", 10)
    stem = model.stem[0]
    assert needs_data_init(model) and not build_model("fastnet", 10).__dict__.get("whitening")
    assert not needs_data_init(build_model("fastnet", 10))
    before = stem.weight.clone()
    init_from_data(model, x)
    assert not torch.equal(before, stem.weight) and not stem.weight.requires_grad
    # +/- pairs: the second half of the filters is the first half negated
    half = stem.out_channels // 2
    assert torch.equal(stem.weight[half:], -stem.weight[:half])
    # on the images it was fitted to, each positive filter's output has variance
    # lambda / (lambda + eps) (1 for the strong directions) and no cross-correlation
    with torch.no_grad():
        out = F.conv2d(x, stem.weight[:half]).permute(0, 2, 3, 1).reshape(-1, half).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov.diag()[:6], torch.ones(6, dtype=torch.float64), atol=0.05)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-3
    assert (cov.diag() <= 1 + 1e-4).all()
    # deterministic given the images
    other = build_model("airbench", 10)
    init_from_data(other, x)
    assert torch.equal(other.stem[0].weight, stem.weight)


def test_dirac_init_passes_the_input_through_and_bn_scale_is_frozen():
    torch.manual_seed(0)
    model = build_model("airbench", 10, width=0.5)
    conv = model.group2.conv2  # 128 -> 128
    w = conv.weight.detach()
    eye = torch.zeros_like(w)
    nn.init.dirac_(eye)
    assert torch.equal(w, eye)  # square: every filter is the identity
    conv1 = model.group2.conv1  # 32 -> 128: the first 32 filters are identities, the rest random
    w1 = conv1.weight.detach()
    identity = torch.zeros_like(w1[:32])
    nn.init.dirac_(identity)
    assert torch.equal(w1[:32], identity) and w1[32:].abs().sum() > 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad and m.momentum == 0.4 for m in bns)


def test_bias_lr_scale_puts_norm_parameters_in_a_faster_group():
    model = build_model("airbench", 10, width=0.25)
    plain = param_groups(model, 1e-3)
    assert len(plain) == 2 and "lr" not in plain[1]  # the layout old checkpoints hold
    groups = param_groups(model, 1e-3, lr=0.5, bias_lr_scale=64)
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0, 0.0]
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in groups[2]["params"]} == norm_biases and groups[2]["lr"] == 32.0
    assert [id(p) for p in groups[1]["params"]] == [id(model.stem[0].bias)]  # the stem's bias: base lr
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    opt = torch.optim.SGD(groups, lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5, 32.0]
    with pytest.raises(ValueError):
        param_groups(model, 1e-3, bias_lr_scale=2.0)


def _train(model: nn.Module, lookahead: Lookahead, steps: range, total: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(total)]
    for step in steps:
        x, y = data[step]
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        lookahead.after_step(model, step + 1)


def test_lookahead_matches_the_hand_computed_ema():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    la = Lookahead(total_steps=20, every=5, base=0.9, power=2.0, start=0.3)
    assert la.first == 6
    snapshots = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = None
    for step in range(1, 21):
        opt.zero_grad()
        F.mse_loss(model(torch.ones(1, 3) * step), torch.zeros(1, 2)).backward()
        opt.step()
        w = model.weight.detach().clone()
        if step >= 6 and step % 5 == 0:
            if ema is None:
                ema = w.clone()
            else:
                rho = 0.9**5 * (step / 20) ** 2
                ema = rho * ema + (1 - rho) * w
        la.after_step(model, step)
        snapshots[step] = model.weight.detach().clone()
        if step in (10, 15, 20):
            assert torch.allclose(snapshots[step], ema, atol=1e-6)
    assert la.ema is not None and torch.allclose(la.ema["weight"], ema, atol=1e-6)


def test_lookahead_resumes_exactly_from_an_epoch_boundary():
    total, per_epoch = 30, 10
    torch.manual_seed(0)
    start = nn.Linear(3, 2)
    straight, la = copy.deepcopy(start), Lookahead(total)
    for epoch in range(3):
        la.begin_epoch(straight, epoch * per_epoch)
        _train(straight, la, range(epoch * per_epoch, (epoch + 1) * per_epoch), total)
        la.end_epoch(straight)
        if epoch == 1:
            checkpoint = copy.deepcopy(straight.state_dict())
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(checkpoint)  # a restart after epoch 2: a fresh Lookahead
    la2 = Lookahead(total)
    la2.begin_epoch(resumed, 2 * per_epoch)
    _train(resumed, la2, range(2 * per_epoch, 3 * per_epoch), total)
    la2.end_epoch(resumed)
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-7), k


def test_tta_levels_average_the_views_they_name():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, 0), model(x))
        mirror = 0.5 * model(x) + 0.5 * model(x.flip(-1))
        assert torch.allclose(tta_logits(model, x, 1), mirror)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :8, :8], padded[..., 2:, 2:]
        assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1])  # content moved by one pixel
        shifted = [0.5 * model(v) + 0.5 * model(v.flip(-1)) for v in (up_left, down_right)]
        want = 0.5 * mirror + 0.25 * shifted[0] + 0.25 * shifted[1]
        assert torch.allclose(tta_logits(model, x, 2), want, atol=1e-6)
        # a mirror-symmetric input gives the same answer with and without level 1
        sym = torch.cat([x[..., :4], x[..., :4].flip(-1)], dim=-1)
        lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 5)).eval()
        assert torch.allclose(tta_logits(lin, sym, 1), lin(sym), atol=1e-6)


def test_a_fresh_airbench_student_is_whitened_from_the_images_it_is_given(real_images):
    from effray.compress.config import CompressConfig
    from effray.compress.steps import build_student

    _, x = real_images
    teacher = build_model("fastnet", 10, width=0.25)
    cfg = CompressConfig(student="airbench", student_width=0.25, kd_alpha=0.5)
    student = build_student(teacher, cfg, images=lambda: x)
    want = build_model("airbench", 10, width=0.25)
    init_from_data(want, x)
    assert torch.equal(student.stem[0].weight, want.stem[0].weight) and student.training
    untouched = build_student(teacher, cfg)  # no images: left as built (still runs)
    assert not torch.equal(untouched.stem[0].weight, want.stem[0].weight)

    def unread() -> torch.Tensor:
        raise AssertionError("a student without data-dependent init must not read images")

    build_student(teacher, CompressConfig(student="resnet20", kd_alpha=0.5), images=unread)
    build_student(teacher, CompressConfig(prune_rate=0.5), images=unread)  # a copy of the teacher


def test_decay_biases_gives_every_parameter_the_weights_decay_per_step():
    """airbench decays BatchNorm biases at wd / (their lr) so that lr x decay, the shrink
    per step, is the same for every parameter; --decay-biases does the same."""
    model = build_model("airbench", 10, width=0.25)
    groups = param_groups(model, 1e-3, lr=0.5, bias_lr_scale=64, decay_biases=True)
    opt = torch.optim.SGD(groups, lr=0.5)
    assert [g["lr"] * g["weight_decay"] for g in opt.param_groups] == pytest.approx([5e-4] * 3)
    assert [g["weight_decay"] for g in param_groups(model, 1e-3, decay_biases=True)] == [1e-3, 1e-3]


def test_convs_and_head_keep_pytorchs_default_init_as_airbench():
    """Uniform(+-1/sqrt(fan_in)) outside the identity filters (std 1/sqrt(3 fan_in)),
    not Kaiming's fan-out normal, which is ~2.5x larger: under BatchNorm that scales the
    effective step down ~6x for the same lr."""
    torch.manual_seed(0)
    model = build_model("airbench", 10, width=1.0)
    for conv, fan_in in ((model.group1.conv1, 24 * 9), (model.group2.conv1, 64 * 9)):
        rest = conv.weight.detach()[conv.in_channels :]  # past the dirac filters
        assert rest.abs().max() <= 1 / fan_in**0.5
        assert rest.std().item() == pytest.approx(1 / (3 * fan_in) ** 0.5, rel=0.05)
    fc = model.head.fc.weight.detach()
    assert fc.abs().max() <= 1 / 256**0.5 and fc.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.1)


def _reference():
    """bench/airbench_reference.py: airbench94's code path, written out independently of effray."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "airbench_reference.py"
    spec = importlib.util.spec_from_file_location("airbench_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_effray_flags_step_airbench_exactly_as_airbench94s_own_formulation():
    """The bench's translation of airbench94's hyperparameters (lr 11.5 and wd 0.0153 per
    1,024 on a summed loss, momentum 0.85) into effray's flags (lr 11.5 B / (1024 (1 +
    1/0.15)) = 1.5 at B = 1024, wd 0.0153 / 11.5, --bias-lr-scale 64, --decay-biases,
    label smoothing 0.2, the 0.2 -> 1 -> 0.07 one-cycle, the whitening bias frozen by
    dropping its gradient) gives the same weights and BatchNorm statistics, step for
    step, as airbench94's optimizer, loss and schedule on the same net."""
    from effray.train.step import Schedule, soft_cross_entropy

    ref = _reference()
    torch.manual_seed(0)
    theirs = ref.make_net(0.125)
    ours = build_model("airbench", 10, width=0.125).to(memory_format=torch.channels_last)
    pairs = list(zip(theirs.state_dict().values(), ours.state_dict().values(), strict=True))
    assert all(a.shape == b.shape for a, b in pairs)
    initial = [a.clone() for a, _ in pairs]
    ours.load_state_dict(dict(zip(ours.state_dict(), initial)))
    batch, steps, freeze_at = 64, 6, 2
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)
    ]

    opt_theirs = ref.make_optimizer(theirs, batch)
    sched_theirs = torch.optim.lr_scheduler.LambdaLR(opt_theirs, ref.lr_factor(steps))
    kilostep_scale = 1024 * (1 + 1 / 0.15)
    lr = 11.5 * batch / kilostep_scale
    assert 11.5 * 1024 / kilostep_scale == pytest.approx(1.5, abs=1e-3)  # the bench's --lr at batch 1024
    opt_ours = torch.optim.SGD(
        param_groups(ours, 0.0153 / 11.5, lr, bias_lr_scale=64, decay_biases=True), lr=lr, momentum=0.85, nesterov=True
    )
    sched_ours = torch.optim.lr_scheduler.LambdaLR(opt_ours, Schedule("onecycle", steps, int(0.23 * steps), 0.2, 0.07))
    loss_theirs = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    for step, (x, y) in enumerate(data):
        theirs[0].bias.requires_grad = step < freeze_at
        loss = loss_theirs(theirs(x), y).sum()
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()
        sched_theirs.step()

        opt_ours.zero_grad(set_to_none=True)
        soft_cross_entropy(ours(x), {"label": y}, 0.2).backward()
        if step >= freeze_at:
            ours.stem[0].bias.grad = None  # what train_step does with --whiten-bias-epochs
        opt_ours.step()
        sched_ours.step()
    moved = [not torch.equal(a, b) for a, b in zip(initial, theirs.state_dict().values())]
    assert sum(moved) > len(moved) // 2  # the steps did something
    for (name, b), a in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
