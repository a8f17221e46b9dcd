"""QAT keeps BatchNorm and simulates its fold (``--qat-bn simulate``): in eval mode the pair
computes the folded layer, the real fold at the end moves no code, training normalises
with batch statistics, a mid-QAT checkpoint restores its links, and ``--qat-bn fold``
folds before QAT as before."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effray.compress.artifact import load_artifact, restore, save_artifact, snapshot
from effray.compress.config import CompressConfig
from effray.compress.fakequant import QUANT_TYPES, bn_factor
from effray.compress.quantize import has_linked_bn, recalibrate_bn
from effray.compress.steps import apply_quantization, finish
from effray.config import validated
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {} if name.startswith("torchvision:") else {"width": 0.25}
    return build_model(name, 10, **kw).eval()


def calib(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def quantized(name: str, **fields) -> tuple[nn.Module, CompressConfig]:
    cfg = validated(CompressConfig(**{"bits": 4, "act_bits": 32, "calib_batches": 2, **fields}))
    return apply_quantization(model_of(name), cfg, calib()), cfg


@pytest.mark.parametrize("name", ["resnet20", "convnet", "torchvision:resnet18"])
def test_the_simulated_fold_is_the_folded_layer_and_folding_moves_no_code(name):
    model, cfg = quantized(name)
    assert has_linked_bn(model) and any(isinstance(m, BN) for m in model.modules())
    linked = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES) and m.linked_bn is not None}
    codes = {n: m.wq.codes(m.folded_weight()) for n, m in linked.items()}
    x = calib(1)[0][0]
    ref = model.eval()(x)
    folded = finish(copy.deepcopy(model), cfg, calib())
    assert not has_linked_bn(folded)
    left = {n for n, m in folded.named_modules() if isinstance(m, BN)}
    assert not left & {n for n, m in model.named_modules() if any(m is q.linked_bn for q in linked.values())}
    for n, c in codes.items():  # the step sizes were learned on the folded weight: the same codes
        q = folded.get_submodule(n)
        assert torch.equal(q.wq.codes(q.weight), c)
    # the same function up to the fp16 rounding of the folded biases (without it, within 1e-5 on
    # torchvision's ResNet-18); 20 random layers amplify that rounding to ~0.2 % of the logits
    assert torch.allclose(folded(x), ref, atol=5e-3 * ref.abs().max().item())


def test_after_training_the_fold_takes_the_new_statistics_and_keeps_the_codes():
    """QAT moves the BN statistics but not the factor the weights are quantized with; the
    fold absorbs the difference into each channel's step size."""
    model, cfg = quantized("resnet20", bits=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x, _ in calib(3):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    linked = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES) and m.linked_bn is not None}
    moved = [n for n, m in linked.items() if not torch.allclose(m.bn_scale, bn_factor(m.linked_bn))]
    assert moved  # the statistics tracked the quantized net, the quantizers' factor stayed
    codes = {n: m.wq.codes(m.folded_weight()) for n, m in linked.items()}
    x = calib(1)[0][0]
    ref = model.eval()(x)
    folded = finish(copy.deepcopy(model), cfg, calib())
    same = sum(
        int((folded.get_submodule(n).wq.codes(folded.get_submodule(n).weight) == c).sum()) for n, c in codes.items()
    )
    assert same >= 0.999 * sum(c.numel() for c in codes.values())  # only fp16 re-rounding of a step may flip one
    assert torch.allclose(folded(x), ref, atol=5e-3 * ref.abs().max().item())


def test_training_normalises_with_batch_statistics_and_trains_the_bn():
    model, _ = quantized("resnet20")
    conv = model.s1b0.conv1
    bn = conv.linked_bn
    assert bn is model.s1b0.bn1
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().clone()  # the factor this forward folds with
    mean_before = bn.running_mean.clone()
    seen = {}
    hooks = [
        conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach())),
        bn.register_forward_hook(lambda m, i, o: seen.update(out=o.detach())),
    ]
    model.train()
    model(calib(1)[0][0]).logsumexp(1).mean().backward()
    for h in hooks:
        h.remove()
    with torch.no_grad():  # the layer's output: the quantized folded conv, the factor divided back out
        folded = F.conv2d(seen["x"], conv.wq(conv.weight * a.view(-1, 1, 1, 1)), None, conv.stride, conv.padding)
    assert torch.allclose(seen["y"] * a.view(1, -1, 1, 1), folded, atol=1e-4)
    # and the BN after it normalised with the batch's statistics
    batch = F.batch_norm(seen["y"], None, None, bn.weight.detach(), bn.bias.detach(), True, 0.0, bn.eps)
    assert torch.allclose(seen["out"], batch, atol=1e-5)
    assert not torch.equal(bn.running_mean, mean_before)  # its statistics track the quantized net
    assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
    assert conv.weight.grad.abs().sum() > 0 and conv.wq.scale.grad is not None


def test_fold_mode_folds_before_qat():
    model, _ = quantized("resnet20", qat_bn="fold")
    assert not has_linked_bn(model)
    assert not any(isinstance(m, BN) for m in model.modules())


def test_a_mid_qat_checkpoint_restores_its_links_and_its_artifact_is_the_folded_model(tmp_path):
    model, cfg = quantized("convnet")
    x = calib(1)[0][0]
    restored = restore(snapshot(model)).eval()
    assert has_linked_bn(restored)
    assert torch.equal(restored(x), model.eval()(x))
    save_artifact(tmp_path / "mid", model)  # a trial's size so far: written as it will deploy
    assert has_linked_bn(model)  # the model itself trains on
    save_artifact(tmp_path / "end", finish(copy.deepcopy(model), cfg, calib()))
    mid, _ = load_artifact(tmp_path / "mid")
    end, _ = load_artifact(tmp_path / "end")
    assert torch.equal(mid(x), end(x))
    assert (tmp_path / "mid" / "model.pt").stat().st_size == (tmp_path / "end" / "model.pt").stat().st_size


def test_recalibrate_bn_averages_the_batches_and_keeps_momentum():
    model = model_of("resnet20")
    bn = model.s1b0.bn1
    seen = []
    handle = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    batches = calib(2)
    recalibrate_bn(model, batches, max_batches=2)
    handle.remove()
    feats = torch.cat(seen)  # two equal batches: their mean is the mean of both
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and not model.training
