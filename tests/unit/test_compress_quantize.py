"""Quantization: every conv and linear really k-bit, gradients through fake quant, BN
folding exact, PTQ frozen, and the int8 runtime (PT2E, oneDNN kernels) close to float, on
the student's own weight grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effray.compress.fakequant import QUANT_TYPES, ActQuant, FakeQuant
from effray.compress.int8 import int8_ops, quantize_int8, to_int8
from effray.compress.program import export_program
from effray.compress.quantize import QUANTIZERS, bits_per_layer, calibrate, dequantize, fold_bn, quantize_model
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "resnet20") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, width=0.25 if name != "convnet" else 0.5).eval()


def data(n: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_registry():
    assert set(QUANTIZERS.names()) == {"qat", "ptq"}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("name", ["resnet20", "convnet", "fastnet"])
def test_every_conv_and_linear_is_k_bit(name, bits):
    model = quantize_model(tiny(name), bits, first_bits=bits, last_bits=bits)
    calibrate(model, data(1))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(isinstance(m, QUANT_TYPES) for m in layers)  # no Conv2d skipped
    for m in layers:
        w = m.qweight().detach().flatten(1)
        distinct = max(len(torch.unique(row)) for row in w)
        assert distinct <= 2**bits
    assert set(bits_per_layer(model).values()) == {bits}


def test_first_and_last_layer_bits():
    model = quantize_model(tiny(), 4, first_bits=8, last_bits=32)
    bits = bits_per_layer(model)
    assert bits["stem.0"] == 8 and bits["head.fc"] == 32 and bits["s2b0.conv1"] == 4
    assert type(model.head.fc) is nn.Linear  # 32 = left in float


def test_fake_quant_forward_and_lsq_gradients():
    x = torch.tensor([[-1.3, -0.2, 0.0, 0.26, 0.7, 5.0]], requires_grad=True)
    s = torch.tensor(0.25, requires_grad=True)
    y = FakeQuant.apply(x, s, -4.0, 3.0, 1.0)
    assert y.tolist() == [[-1.0, -0.25, 0.0, 0.25, 0.75, 0.75]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]  # straight-through inside the range only
    v = x.detach() / 0.25
    expected = torch.where((v >= -4) & (v <= 3), v.clamp(-4, 3).round() - v, v.clamp(-4, 3)).sum()
    assert s.grad.item() == pytest.approx(expected.item(), abs=1e-6)


def test_qat_trains_weights_and_step_sizes():
    model = QUANTIZERS.get("qat")(tiny().train(), data(1), bits=4)
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    q = model.s2b0.conv1
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.wq.scale.grad is not None and q.wq.scale.grad.abs().sum() > 0


def test_ptq_is_frozen():
    model = QUANTIZERS.get("ptq")(tiny(), data(1), bits=4, act_range="lsq")
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    before = [float(a.scale) for a in acts]
    model.train()(data(1)[0][0] * 10)  # a training-mode forward on wider data moves nothing
    assert [float(a.scale) for a in acts] == before
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("scale"))


@pytest.mark.parametrize("name", ["resnet20", "convnet", "fastnet"])
def test_fold_bn_is_exact_enough(name):
    model = tiny(name)
    for m in model.modules():  # non-trivial running stats
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    fold_bn(model)
    assert torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4)
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    # fastnet's BNs after a max-pool can't be folded; every conv->BN pair is
    assert left == ([] if name != "fastnet" else [f"group{i}.bn1" for i in (1, 2, 3)])


def test_dequantize_gives_plain_layers_with_the_fake_quant_weights():
    model = QUANTIZERS.get("ptq")(fold_bn(tiny()), data(1), bits=3)
    plain = dequantize(model)
    assert not any(isinstance(m, QUANT_TYPES) for m in plain.modules())
    assert torch.equal(plain.s1b0.conv1.weight, model.s1b0.conv1.qweight())


@pytest.mark.parametrize("bad", [1, 9, 16, 0])
def test_bad_bits_is_one_line(bad):
    with pytest.raises(EffrayError, match="must be 2..8"):
        quantize_model(tiny(), bad)


@pytest.mark.parametrize("name", ["resnet20", "convnet"])
def test_int8_runtime_is_close_to_float(name):
    model = tiny(name)
    calib = data(2)
    q8 = to_int8(model, calib).eval()  # eval(): as every caller (measure, accuracy) does
    ops = int8_ops(q8)  # real int8 kernels, not float arithmetic on int8 values
    assert any(op.startswith("onednn.qconv") for op in ops), ops
    assert any(op.startswith("onednn.qlinear") for op in ops), ops
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q8.modules())  # no float layer left behind
    for x in (calib[0][0], calib[1][0][:1], calib[1][0][:3]):  # the calibration batch size and others
        ref, out = model(x), q8(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 0.1 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_weights_are_the_students_k_bit_weights(bits):
    """Each int8 weight, dequantized, is the fake-quant weight the student trained with,
    bit for bit: the int8 scale is the student's step, the codes its k-bit codes (the
    observer's own max|w|/127.5 scale would re-round them)."""
    model = QUANTIZERS.get("ptq")(fold_bn(tiny("convnet")), data(1), bits=bits, first_bits=bits, last_bits=bits)
    converted = quantize_int8(model, data(2), reduce_range=False)  # as with VNNI: every layer int8
    fetch = lambda a: getattr(converted, a.target) if isinstance(a, torch.fx.Node) else a  # noqa: E731
    int8_weights = [
        n.target(*[fetch(a) for a in n.args])
        for n in converted.graph.nodes
        if "dequantize_per_channel" in str(n.target) and n.args[0].op == "get_attr"
    ]
    layers = [m for m in model.modules() if isinstance(m, QUANT_TYPES)]
    assert len(int8_weights) == len(layers) == 4
    for m in layers:
        assert any(w.shape == m.weight.shape and torch.equal(w, m.qweight()) for w in int8_weights), m


@pytest.mark.parametrize("reduce_range", [True, False])
def test_a_students_int8_program_computes_what_the_student_does(reduce_range):
    """A student with 8-bit activations (4-bit weights, first/last layer 8): its int8
    program rounds where the student rounds, on the student's grids, and nowhere else (the
    pools stay float), so it computes the student's logits. Without VNNI (``reduce_range``)
    the 8-bit-weight layers stay float and exact, the 4-bit ones run int8 at full range
    (their int16 pair sums can't overflow); with it every layer is int8."""
    from effray.compress.int8 import lower_x86

    model = QUANTIZERS.get("ptq")(fold_bn(tiny("convnet")), data(1), bits=4)
    converted = quantize_int8(model, data(2), reduce_range=reduce_range)
    eight = [n for n, m in model.named_modules() if isinstance(m, QUANT_TYPES) and m.bits == 8]
    assert eight and converted.meta["float_layers"] == (eight if reduce_range else [])
    x = data(1, size=32)[0][0]
    ref = model(x)
    assert (converted(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    if reduce_range:  # this CPU's own kernels (oneDNN int8 without VNNI) on the int8 layers
        lowered = lower_x86(converted, x[:2])
        assert any(op.startswith("onednn.qconv") for op in int8_ops(lowered))
        assert torch.equal(lowered(x).argmax(1), ref.argmax(1))
        assert (lowered(x) - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_a_model_torch_export_cannot_capture_names_its_layer():
    class Branchy(nn.Module):  # control flow on a tensor's value: not capturable
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Branchy())
    with pytest.raises(EffrayError, match=r"torch.export can't capture layer '1' \(Branchy\)"):
        export_program(model, torch.randn(2, 3, 8, 8))


def test_8_bit_weight_step_sizes_stay_at_their_calibrated_value_while_4_bit_ones_learn():
    """The 8-bit first conv and classifier of a 4-bit model keep their MSE-calibrated steps
    (learned, they grew 6-13x in 20 fine-tuning steps of a converged convnet); the 4-bit
    layers learn theirs, and the 8-bit steps are still in the optimizer-free state dict."""
    from effray.compress.fakequant import LEARNED_STEP_BELOW, WeightQuant

    model = QUANTIZERS.get("qat")(tiny().train(), data(1), bits=4)
    quants = {n: m for n, m in model.named_modules() if isinstance(m, WeightQuant)}
    learned = {n for n, m in quants.items() if m.scale.requires_grad}
    assert learned == {n for n, m in quants.items() if m.bits < LEARNED_STEP_BELOW} and learned
    assert {m.bits for n, m in quants.items() if n not in learned} == {8}
    before = {n: m.scale.detach().clone() for n, m in quants.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for x, y in data(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, m in quants.items():
        assert torch.equal(m.scale, before[n]) == (n not in learned), n
