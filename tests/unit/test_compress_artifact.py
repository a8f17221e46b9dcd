"""The contract every pruner x quantizer meets, measured on the artifact file itself:
the model runs, save -> load is exact, sparsity and k-bit values survive, the file is
as small as the bits say, and the loader needs nothing but the file."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from effray.compress.artifact import (
    FORMAT,
    load_artifact,
    read_layout,
    record_temperature,
    restore,
    save_artifact,
    snapshot,
    temperature_of,
)
from effray.compress.fakequant import QUANT_TYPES
from effray.compress.measure import count_macs, parameter_count
from effray.compress.pack import pack_bits, theory_bytes, unpack_bits
from effray.compress.prune import PRUNERS, prune_step, weight_sparsity
from effray.compress.quantize import QUANTIZERS, fold_bn
from effray.errors import EffrayError
from effray.models import build_model
from effray.train.checkpoint import load_checkpoint

NONE = "none"


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def compressed(name: str, pruner: str, quantizer: str, rate: float = 0.5, bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 10, width=0.25 if name != "convnet" else 0.5).eval()
    if pruner != NONE:
        prune_step(model, rate, pruner)
    if quantizer != NONE:
        fold_bn(model)
        QUANTIZERS.get(quantizer)(model, data(1), bits=bits, first_bits=8, last_bits=8)
    return model.eval()


def size_floor(model: nn.Module) -> int:
    """Bytes the bits say the weights need: theory for k-bit layers, 4 bytes per non-zero
    float otherwise (bitmap when sparse)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QUANT_TYPES):
            w = m.weight
            total += theory_bytes(w.numel(), m.bits, w.shape[0], int((m.wq.codes(w) != 0).sum()))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            n, nnz = m.weight.numel(), int((m.weight != 0).sum())
            total += min(4 * n, math.ceil(n / 8) + 4 * nnz)
    return total


@pytest.mark.parametrize("quantizer", [NONE, *QUANTIZERS.names()])
@pytest.mark.parametrize("pruner", [NONE, *PRUNERS.names()])
@pytest.mark.parametrize("name", ["resnet20", "convnet"])
def test_contract(tmp_path, name, pruner, quantizer):
    model = compressed(name, pruner, quantizer)
    x = data(1, 4)[0][0]
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()  # still runs

    path = save_artifact(tmp_path, model, method={"prune": pruner, "quant": quantizer}, codec="none")
    loaded, payload = load_artifact(tmp_path)
    assert payload["format"] == FORMAT
    with torch.no_grad():
        assert torch.equal(loaded(x), out)  # exact round trip
    for a, b in zip(model.modules(), loaded.modules()):
        if isinstance(a, QUANT_TYPES):  # dequantized weights are the fake-quant weights, bit for bit
            assert torch.equal(b.weight, a.qweight().detach()) and b.bits == a.bits
            assert max(len(torch.unique(r)) for r in b.weight.flatten(1)) <= 2**a.bits
        elif isinstance(a, (nn.Conv2d, nn.Linear)):
            assert torch.equal(b.weight, a.weight)
    if pruner == "unstructured":
        assert weight_sparsity(loaded) >= 0.5 - 1e-4
    if pruner == "structured":
        base = build_model(name, 10, width=0.25 if name != "convnet" else 0.5)
        assert parameter_count(loaded) < 0.5 * parameter_count(base)
        assert count_macs(loaded)["macs"] < 0.5 * count_macs(base)["macs"]

    # the file is the bits: weights at their theoretical size + a few KB of layout
    floor, size = size_floor(model), os.path.getsize(path)
    others = sum(
        t.numel() * 4 for k, t in model.state_dict().items() if not k.endswith("weight") and t.is_floating_point()
    )
    assert floor <= size <= floor + others + 5000, (floor, others, size)


def test_quantized_weights_pack_at_theory(tmp_path):
    model = compressed("convnet", NONE, "ptq", bits=3)
    save_artifact(tmp_path, model)
    _, payload = load_artifact(tmp_path)
    rows = {row[0]: row for row in read_layout(payload)["tensors"]}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_TYPES):
            enc, nbytes = rows[f"{name}.weight"][1], rows[f"{name}.weight"][5]
            assert enc == "qdense" and nbytes == math.ceil(m.weight.numel() * m.bits / 8)
            assert rows[f"{name}.wq.scale"][5] == 2 * m.weight.shape[0]  # fp16 per output channel


def test_structured_artifact_records_shapes_and_loads_through_the_checkpoint_loader(tmp_path):
    model = compressed("resnet20", "structured", "qat")
    save_artifact(
        tmp_path,
        model,
        config={"prune_rate": 0.5},
        teacher={"checksum": "sha256:abc"},
        data={"mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 10},
    )
    loaded, payload = load_checkpoint(tmp_path)  # what effray evaluate calls
    modules = read_layout(payload)["modules"]
    assert modules["s1b0.conv1"]["args"]["out_channels"] == model.s1b0.conv1.out_channels < 4
    assert modules["s1b0.conv1"]["bits"] == 4 and modules["stem.0"]["bits"] == 8
    assert modules["s1b0.bn1"]["type"] == "Identity"  # folded
    assert payload["teacher"]["checksum"] == "sha256:abc" and payload["config"]["prune_rate"] == 0.5
    torch.load(tmp_path / "model.pt", weights_only=True)  # plain data only


def test_lzma_codec_round_trips_and_shrinks(tmp_path):
    model = compressed("convnet", "unstructured", "ptq", rate=0.8, bits=4)
    plain = os.path.getsize(save_artifact(tmp_path / "a", model, codec="none"))
    packed = os.path.getsize(save_artifact(tmp_path / "b", model, codec="lzma"))
    a, _ = load_artifact(tmp_path / "a")
    b, _ = load_artifact(tmp_path / "b")
    x = data(1, 2)[0][0]
    assert torch.equal(a(x), b(x))
    assert packed < plain


def test_damaged_artifact_is_one_line(tmp_path):
    model = compressed("convnet", NONE, "ptq")
    path = save_artifact(tmp_path, model)
    payload = torch.load(path, weights_only=True)
    payload["blob"] = payload["blob"][:100]
    torch.save(payload, path)
    with pytest.raises(EffrayError, match="damaged") as err:
        load_artifact(tmp_path)
    assert "\n" not in str(err.value)


def test_a_recorded_temperature_keeps_the_files_size_and_an_older_file_reads_as_one(tmp_path):
    model = compressed("convnet", NONE, "ptq")
    path = save_artifact(tmp_path, model)
    size, (_, payload) = os.path.getsize(path), load_artifact(tmp_path)
    assert temperature_of(payload) == 1.0  # saved, not yet measured
    record_temperature(tmp_path, 0.6180339887)
    assert os.path.getsize(path) == size  # what the search predicted and measured, to the byte
    reloaded, payload = load_artifact(path)
    assert temperature_of(payload) == 0.6180339887
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(x), model.eval()(x))  # only the metadata changed
    older = {k: v for k, v in payload.items() if k != "temperature"}
    assert temperature_of(older) == 1.0
    with pytest.raises(EffrayError, match="positive"):
        record_temperature(tmp_path, float("nan"))
    with pytest.raises(EffrayError, match="positive"):
        temperature_of({**payload, "temperature": -1.0})
    assert temperature_of(torch.load(path, weights_only=True)) == 0.6180339887  # refusals wrote nothing


def test_not_an_artifact(tmp_path):
    torch.save({"format": "effray.train/1"}, tmp_path / "model.pt")
    with pytest.raises(EffrayError, match="not a compressed artifact"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 1001])
def test_pack_bits_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_mixed_bits_and_float_layers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = fold_bn(build_model("fastnet", 10, width=0.125).eval())  # a BN left after a pool, GELU, max-pool head
    QUANTIZERS.get("qat")(model, data(1), bits=2, act_bits=32, first_bits=32, last_bits=8)
    model.eval()
    save_artifact(tmp_path, model)
    loaded, payload = load_artifact(tmp_path)
    x = data(1, 2)[0][0]
    assert torch.equal(loaded(x), model(x))
    bits = payload["method"] or {}
    modules = read_layout(payload)["modules"]
    assert "bits" not in modules["stem.0"] and modules["group1.conv1"]["bits"] == 2 and modules["head.fc"]["bits"] == 8
    assert modules["group1.bn1"]["type"] == "BatchNorm2d" and bits == {}


def test_training_snapshot_restores_latent_weights(tmp_path):
    """Fine-tuning checkpoints keep the latent fp32 weights (the artifact keeps codes only)."""
    model = compressed("resnet20", "structured", "qat")
    torch.save(snapshot(model), tmp_path / "snap.pt")
    back = restore(torch.load(tmp_path / "snap.pt", weights_only=True))
    assert back.training and back.s2b0.conv1.wq.scale.requires_grad
    assert torch.equal(back.s2b0.conv1.weight, model.s2b0.conv1.weight)  # latent, not dequantized
    x = data(1, 2)[0][0]
    assert torch.equal(back.eval()(x), model(x))
