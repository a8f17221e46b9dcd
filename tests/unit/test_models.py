"""Contract tests for effray.models: every registered model gets the same checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from effray.errors import EffrayError
from effray.models import build_model, count_parameters, model_names

ALL = model_names()
# One per family, cheap enough to train 30 steps on 2 shared CPU cores in under a second;
# resnet32/56/18 share resnet20's code and only cost time.
TRAINABLE = ["convnet", "fastnet", "resnet20", "airbench"]

# Published counts (option-A shortcuts, 10 classes); option B adds 1x1 projections.
PUBLISHED = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet18": 11.17e6}


@pytest.fixture(autouse=True)
def _few_threads():
    # The machine is shared; more threads than cores only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_registry_has_the_contracted_models():
    assert set(ALL) >= {"convnet", "resnet20", "resnet32", "resnet56", "resnet18", "fastnet", "airbench"}
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, in_channels, num_classes):
    model = build_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        y = model(torch.randn(2, in_channels, 32, 32))
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_train_mode_forward_and_backward(name):
    model = build_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    x_before = x.clone()
    model(x).sum().backward()
    assert torch.equal(x, x_before), "forward modified its input in place"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]  # frozen ones: by design
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_close_to_published(name):
    n = count_parameters(build_model(name, num_classes=10))
    assert n == pytest.approx(PUBLISHED[name], rel=0.02)


def test_exact_parameter_counts_pin_the_architectures():
    # Pinned so an accidental architecture change shows up here, not in a results table.
    expected = {
        "airbench": 1_972_792,  # airbench94: 1.97M
        "convnet": 545_322,
        "fastnet": 1_978_016,
        "resnet18": 11_173_962,
        "resnet20": 272_474,  # 269,722 (option A) + 2,752 for two 1x1 projections
        "resnet32": 466_906,
        "resnet56": 855_770,
    }
    got = {name: count_parameters(build_model(name, num_classes=10)) for name in expected}
    assert got == expected


def test_count_parameters_trainable_only():
    model = build_model("resnet20", num_classes=10)
    total = count_parameters(model)
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - (64 * 10 + 10)
    assert count_parameters(model) == total


@pytest.mark.parametrize("name", ALL)
def test_width_scales_parameters(name):
    counts = [count_parameters(build_model(name, 10, width=w)) for w in (0.25, 0.5, 1.0)]
    assert counts[0] < counts[1] < counts[2]
    # Conv weights are in x out channels, so doubling width roughly quadruples size.
    assert 3.0 < counts[2] / counts[1] < 4.5
    small = build_model(name, 10, width=0.125).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL)
def test_is_sequential_and_slices_are_pipeline_stages(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    assert isinstance(model, nn.Sequential)
    assert len(model) >= 3
    assert list(model._modules)[-1] == "head"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        h = x
        for child in model:
            h = child(h)
        assert torch.equal(h, expected)
        for cut in range(1, len(model)):
            assert torch.equal(model[cut:](model[:cut](x)), expected)


@pytest.mark.parametrize("name", ALL)
def test_batchnorm_everywhere_and_no_dropout(name):
    model = build_model(name, num_classes=10)
    mods = list(model.modules())
    # airbench's frozen whitening stem is the one conv with a bias and no BN (by design)
    convs = [m for m in mods if isinstance(m, nn.Conv2d) and not getattr(m, "whitening", False)]
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in mods)
    assert len(convs) == bns > 0
    assert not any(isinstance(m, nn.Dropout) for m in mods)
    assert all(not getattr(m, "inplace", False) for m in mods)
    assert all(m.bias is None for m in convs)


def test_resnet_projects_exactly_where_shape_changes():
    model = build_model("resnet20", num_classes=10)
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut") and not isinstance(m, nn.Identity)]
    assert projections == ["s2b0.shortcut", "s3b0.shortcut"]
    assert isinstance(model.s2b0.shortcut[0], nn.Conv2d)
    assert model.s2b0.shortcut[0].kernel_size == (1, 1)


@pytest.mark.parametrize("name", ALL)
def test_spec_rebuilds_the_same_architecture(name):
    model = build_model(name, num_classes=100, in_channels=1, width=0.5)
    spec = model.spec
    assert spec == {"name": name, "num_classes": 100, "in_channels": 1, "width": 0.5}
    assert json.loads(json.dumps(spec)) == spec  # plain dict: safe in any checkpoint
    rebuilt = build_model(**spec)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert repr(rebuilt) == repr(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: keys and shapes match


@pytest.mark.parametrize("name", ALL)
def test_deterministic_init_under_seed(name):
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, num_classes=10, width=0.5).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(EffrayError, match="unknown model 'resnet21'") as err:
        build_model("resnet21", num_classes=10)
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"num_classes": 10, "width": 0}, {"num_classes": 10, "in_channels": 0}],
)
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(EffrayError):
        build_model("convnet", **kwargs)


@pytest.mark.parametrize("name", TRAINABLE)
def test_model_fits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).train()
    # 16x16 keeps this fast; every model pools adaptively, so any size >= 8 works.
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=0.3)
    assert losses[-1] < 0.3 * losses[0], losses


def _halve_conv_out(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    keep = conv.out_channels // 2
    new = nn.Conv2d(conv.in_channels, keep, conv.kernel_size, conv.stride, conv.padding, bias=False)
    return new, nn.BatchNorm2d(keep)


def _halve_conv_in(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels // 2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)


@pytest.mark.parametrize("name", ["convnet", "fastnet", "resnet20"])
def test_structurally_pruned_model_still_runs(name):
    # What the compression stage does: swap layers for narrower ones; forward must follow.
    model = build_model(name, num_classes=10)
    if name == "convnet":
        conv, bn = _halve_conv_out(model.block1[0], model.block1[1])
        model.block1[0], model.block1[1] = conv, bn
        model.head.fc1 = nn.Linear(conv.out_channels * 64, model.head.fc1.out_features, bias=False)
    elif name == "fastnet":
        g = model.group3
        g.conv2, g.bn2 = _halve_conv_out(g.conv2, g.bn2)
        model.head.fc = nn.Linear(g.conv2.out_channels, 10, bias=False)
    else:
        for block in model[1:-1]:
            block.conv1, block.bn1 = _halve_conv_out(block.conv1, block.bn1)
            block.conv2 = _halve_conv_in(block.conv2)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
