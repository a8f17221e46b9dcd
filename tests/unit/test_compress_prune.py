"""Pruning: schedules, exact unstructured sparsity, structured channel removal that keeps
residual networks valid, and the zeros staying zero while fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effray.compress.layers import classifier
from effray.compress.measure import count_macs, parameter_count
from effray.compress.prune import (
    IMPORTANCES,
    PRUNERS,
    channel_counts,
    channel_rate_for_macs,
    lock_sparsity,
    prune_step,
    weight_sparsity,
)
from effray.compress.schedule import SCHEDULES, schedule_rates
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "resnet20", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, width=0.25 if name != "convnet" else 0.5)


def batches(n: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_registries_hold_the_contracted_names():
    assert set(PRUNERS.names()) == {"unstructured", "structured"}
    assert set(IMPORTANCES.names()) == {"l1", "l2", "taylor"}
    assert set(SCHEDULES.names()) == {"oneshot", "cubic"}


def test_schedules():
    assert schedule_rates("oneshot", 4, 0.8) == [0.8] * 4
    cubic = schedule_rates("cubic", 4, 0.8)
    assert cubic[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(cubic, cubic[1:]))
    # Zhu & Gupta: s_t = s_f (1 - (1 - t/n)^3) from s_i = 0
    assert cubic[0] == pytest.approx(0.8 * (1 - 0.75**3))
    # front-loaded: the first half of the events prunes more than half the target
    assert cubic[1] > 0.4


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("name", ["resnet20", "convnet"])
@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_unstructured_sparsity_is_exact_and_permanent(name, importance, rate):
    model = tiny(name)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    prune_step(model, rate, "unstructured", importance, batches=batches())
    assert weight_sparsity(model) == round(rate * n) / n
    # no masks or reparametrisation left behind: plain parameters, plain state dict
    assert not any("mask" in k or "orig" in k for k in model.state_dict())
    assert classifier(model).weight.ne(0).all()  # the output layer is never pruned
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unstructured_steps_only_add_zeros():
    model = tiny()
    prune_step(model, 0.5, "unstructured")
    zeros = [m.weight == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    prune_step(model, 0.7, "unstructured")
    after = [m.weight == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(bool((b | ~a).all()) for a, b in zip(zeros, after))
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weight_sparsity(model) == round(0.7 * n) / n


def test_lock_keeps_zeros_through_sgd_and_leaves_nothing_behind():
    model = tiny()
    prune_step(model, 0.6, "unstructured")
    pruned = weight_sparsity(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    with lock_sparsity(model):
        for x, y in batches(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert weight_sparsity(model) == pruned
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("name", ["resnet20", "convnet"])
def test_structured_removes_channels_and_keeps_residuals_valid(name, importance):
    model = tiny(name).eval()
    before_params, before = parameter_count(model), count_macs(model)["macs"]
    channels = channel_counts(model)
    prune_step(model, 0.5, "structured", importance, batches=batches())
    after = channel_counts(model)
    # physically smaller: fewer channels, parameters and MACs, same output classes
    assert sum(after) / sum(channels) == pytest.approx(0.5, abs=0.05)
    assert parameter_count(model) < 0.4 * before_params
    assert count_macs(model)["macs"] < 0.4 * before
    assert classifier(model).out_features == 10
    out = model(torch.randn(3, 3, 32, 32))  # residual adds still line up
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    if name == "resnet20":
        for block in (m for m in model.modules() if type(m).__name__ == "BasicBlock"):
            shortcut_out = (
                block.shortcut[0].out_channels
                if isinstance(block.shortcut, torch.nn.Sequential)
                else block.conv1.in_channels
            )
            assert block.conv2.out_channels == shortcut_out == block.bn2.num_features


def test_structured_gradual_counts_against_the_base_model():
    model = tiny().eval()
    base = sum(channel_counts(model))
    prune_step(model, 0.25, "structured")
    prune_step(model, 0.5, "structured")
    assert sum(channel_counts(model)) / base == pytest.approx(0.5, abs=0.05)
    prune_step(model, 0.5, "structured")  # already there: nothing more to remove
    assert sum(channel_counts(model)) / base == pytest.approx(0.5, abs=0.05)


def test_channel_rate_for_macs():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()  # full width: 4-channel layers can't hit a rate
    macs = count_macs(model)["macs"]
    prune_step(model, channel_rate_for_macs(0.5), "structured")
    assert count_macs(model)["macs"] / macs == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rate_is_one_line(rate):
    with pytest.raises(EffrayError, match=r"prune rate must be in \[0, 1\)") as err:
        prune_step(tiny(), rate)
    assert "\n" not in str(err.value)


def test_taylor_without_gradients_is_one_line():
    with pytest.raises(EffrayError, match="taylor importance needs gradients"):
        prune_step(tiny(), 0.5, "unstructured", "taylor")
