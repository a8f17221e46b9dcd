"""Per-layer bits and rates: the config's per-layer fields reach the quantizer and the pruner
exactly, and a sensitivity allocation spends the uniform config's bytes where they matter,
checked on the saved file, with real probes of a real model on real CIFAR-10 images."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import self_labelled

from effray.compress.allocate import (
    Allocator,
    LayerBytes,
    allocated,
    layer_choices,
    packed_bytes,
    read_sensitivity,
    uniform_settings,
)
from effray.compress.artifact import encode_state, load_artifact
from effray.compress.config import CompressConfig, format_layers, parse_layers
from effray.compress.cost import predict_costs
from effray.compress.knapsack import Choice, allocate, total
from effray.compress.prune import layer_sparsity, prunable_layers
from effray.compress.quantize import bits_per_layer, quantize_model
from effray.compress.sensitivity import Setting, probe_layer, score, with_drops
from effray.compress.steps import (
    apply_quantization,
    build_student,
    check_layer_names,
    prune_at,
    prune_events,
    save_student,
)
from effray.config import validated
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", 10, 3, 0.5).eval()


@pytest.fixture(scope="module")
def probes(cifar_parquet, tmp_path_factory) -> str:
    """sensitivity.parquet of the convnet: every layer at 2/4/8 bits and 3 unstructured rates,
    scored against its own predictions on 128 real images."""
    model = convnet()
    batches = self_labelled(cifar_parquet, model)
    settings = [Setting("bits", b) for b in (2.0, 4.0, 8.0)] + [Setting("unstructured", r) for r in (0.25, 0.5, 0.75)]
    rows = [r for n, _ in prunable_layers(model) for r in probe_layer(model, n, settings, batches)]
    path = tmp_path_factory.mktemp("sens") / "sensitivity.parquet"
    pq.write_table(pa.Table.from_pylist(with_drops(rows, score(model, batches))), path)
    return str(path)


def test_per_layer_fields_parse_and_refuse_bad_values_in_one_line():
    assert parse_layers("a.0=4, fc=8", "--layer-bits", int) == {"a.0": 4, "fc": 8}
    assert parse_layers(format_layers({"x": 0.12345, "y": 0.5}), "--layer-rates", float) == {"x": 0.1235, "y": 0.5}
    cfg = CompressConfig(layer_bits="features.0=4", layer_rates="features.3=0.5")
    assert cfg.quantizes and cfg.prunes and cfg.per_layer_rates and cfg.final_rate == 0.5
    for bad, words in (
        (dict(layer_bits="conv=9"), "2..8"),
        (dict(layer_bits="conv"), "LAYER=VALUE"),
        (dict(layer_bits="a=4,a=2"), "each layer once"),
        (dict(layer_rates="conv=1.0"), "[0, 1)"),
        (dict(allocation="sensitivity", bits=4), "--sensitivity PATH"),
    ):
        with pytest.raises(EffrayError, match=words.replace("[", r"\[").replace(")", r"\)").replace(".", r"\.")):
            validated(CompressConfig(**bad))


def test_named_layers_get_their_own_bits_first_and_last_included():
    model = convnet()
    names = [n for n, _ in prunable_layers(model)]
    quantize_model(model, 4, layer_bits={names[0]: 6, names[2]: 2, names[-1]: 32})
    got = bits_per_layer(model)
    assert got[names[0]] == 6 and got[names[2]] == 2 and got[names[-1]] == 32
    assert all(got[n] == 4 for n in names[1:-1] if n != names[2])
    acts = {n: m.act_bits for n, m in model.named_modules() if n in names[:-1]}
    assert acts[names[0]] == 8 and acts[names[2]] == 8  # the first layer's input stays at --first-layer-bits
    with pytest.raises(EffrayError, match="no quantizable conv/linear"):
        quantize_model(convnet(), 4, layer_bits={"nope": 4})


def test_per_layer_rates_zero_exactly_their_share_of_each_layer_on_the_schedule():
    model = convnet()
    names = [n for n, _ in prunable_layers(model)]
    rates = {names[0]: 0.1, names[1]: 0.75, names[-1]: 0.5}
    cfg = CompressConfig(layer_rates=format_layers(rates), prune_rate=0.25, prune_schedule="cubic", prune_steps=2)
    events = prune_events(cfg)
    assert max(events.values()) == pytest.approx(0.75)
    for rate in sorted(events.values()):
        prune_at(model, cfg, rate)
    zeros = {n: int((m.weight == 0).sum()) for n, m in prunable_layers(model)}
    for n, m in prunable_layers(model):
        want = rates.get(n, 0.25)  # the unnamed at --prune-rate; the classifier is named here
        assert zeros[n] == round(want * m.weight.numel()), n
    unnamed_classifier = CompressConfig(layer_rates=format_layers({names[0]: 0.5}), prune_rate=0.25)
    fresh = convnet()
    prune_at(fresh, unnamed_classifier, 0.5)
    assert layer_sparsity(fresh)[names[-1]] == 0.0 and layer_sparsity(fresh)[names[1]] == 0.25


@pytest.mark.parametrize("steps", [1, 2])
def test_structured_per_layer_rates_cut_each_layers_share_of_its_channels(steps):
    """Each named layer loses its rate of the base architecture's output channels, the unnamed
    ones --prune-rate's, the classifier none; on a gradual schedule the last event lands on
    the same counts. In a residual net the layers coupled by an add follow their group's
    first layer (the stem's rate reaches every first-stage block's second conv)."""
    for name, rates, coupled in (
        ("convnet", {"stem.0": 0.5, "block1.0": 0.25}, {}),
        ("resnet20", {"stem.0": 0.5, "s3b0.conv1": 0.75}, {f"s1b{i}.conv2": 0.5 for i in range(3)}),
    ):
        torch.manual_seed(0)
        model = build_model(name, 10, width=0.5)
        base = {n: m.weight.shape[0] for n, m in prunable_layers(model)}
        cfg = validated(
            CompressConfig(
                prune_kind="structured",
                layer_rates=format_layers(rates),
                prune_rate=0.25,
                prune_schedule="cubic",
                prune_steps=steps,
                finetune_epochs=4,
            )
        )
        check_layer_names(model, cfg)
        assert len(prune_events(cfg)) == steps
        for rate in sorted(prune_events(cfg).values()):
            prune_at(model, cfg, rate, example_inputs=torch.randn(1, 3, 32, 32))
        kept = {n: m.weight.shape[0] for n, m in prunable_layers(model)}
        out = [n for n, m in prunable_layers(model)][-1]
        for n in kept:
            want = 0.0 if n == out else {**rates, **coupled}.get(n, 0.25)
            assert abs(kept[n] - base[n] * (1 - want)) <= 1, (name, n, base[n], kept[n])
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(EffrayError, match="keeps the classifier's outputs"):
        check_layer_names(convnet(), CompressConfig(prune_kind="structured", layer_rates="head.fc=0.5"))


def test_allocation_spends_bytes_on_the_sensitive_layer_within_budget():
    weight = torch.empty(10, 100)
    dense = {b: packed_bytes(weight, b, weight.numel()) for b in (2, 4, 6)}
    choices = {
        "fragile": [Choice(b, 0.0, {2: 5.0, 4: 1.0, 6: 0.1}[b], dense[b]) for b in (2, 4, 6)],
        "robust": [Choice(b, 0.0, {2: 0.1, 4: 0.02, 6: 0.0}[b], dense[b]) for b in (2, 4, 6)],
    }
    budget = dense[4] * 2  # the uniform 4-bit config's bytes
    picked = allocate(choices, budget)
    assert total(picked) <= budget
    assert (picked["fragile"].bits, picked["robust"].bits) == (6, 2)  # 750 + 270 code and scale bytes = 2 x 520
    assert sum(c.drop for c in picked.values()) == pytest.approx(0.2)  # uniform 4-bit: 1.0 + 0.02
    assert allocate(choices, 1) == {n: c[0] for n, c in choices.items()}  # nothing fits: the cheapest


@pytest.mark.parametrize(("bits", "rate"), [(2, 0.0), (2, 0.5), (4, 0.75), (32, 0.5)])
def test_a_layers_bytes_are_those_the_artifact_packs_for_its_codes(cifar_parquet, bits, rate):
    """Counted on the layer's own weights: codes that round to 0 are packed sparse like pruned
    ones (at 2 bits most are), so the count is the saved blob's, not one from the rate."""
    teacher = convnet()
    names = [n for n, _ in prunable_layers(teacher)]
    middle, rates = names[1], {n: 0.0 for n in names}
    weight = dict(prunable_layers(teacher))[middle].weight
    with torch.no_grad():  # peaked at 0 like trained weights (a fresh init is uniform)
        weight.copy_(torch.distributions.Laplace(0.0, 0.02).sample(weight.shape))
    cfg = CompressConfig(
        bits=8,
        prune_rate=0.0,
        quant_mode="ptq",
        finetune_epochs=0,
        layer_bits=format_layers({middle: bits}),
        layer_rates=format_layers({**rates, middle: rate}),
    )
    student = build_student(teacher, cfg)
    predicted = LayerBytes(student)(middle, bits, rate)
    for r in prune_events(cfg).values():
        prune_at(student, cfg, r)
    apply_quantization(student, cfg, [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))], "ptq")
    _, table = encode_state(student)
    saved = {key: nbytes for key, _, _, _, _, nbytes, _ in table}
    packed = saved[f"{middle}.weight"] + (saved[f"{middle}.wq.scale"] if bits != 32 else 0)
    assert predicted == pytest.approx(packed, rel=0.01)  # BN folds into the conv before its steps are set
    if bits == 2:  # fewer non-zeros than the rate leaves
        assert predicted < packed_bytes(weight, 2, weight.numel() - round(rate * weight.numel()))


def test_a_sensitivity_allocation_is_no_larger_on_file_and_recorded_in_the_artifact(probes, tmp_path):
    teacher = convnet()
    uniform = CompressConfig(bits=4, prune_rate=0.5, finetune_epochs=0, quant_mode="ptq")
    cfg = dataclasses.replace(uniform, allocation="sensitivity", sensitivity=probes)
    allocator = Allocator(teacher)  # a search's: the table and the layers' bytes kept between configs
    resolved = allocator(cfg)
    assert allocator(dataclasses.replace(uniform, bits=2, allocation="sensitivity", sensitivity=probes)).layer_bits
    assert allocator(cfg) == allocated(teacher, cfg) == resolved
    assert resolved.allocation == "sensitivity" and resolved.layer_bits and resolved.layer_rates
    assert allocated(teacher, resolved) == resolved  # made once: a resumed trial keeps its allocation
    assert set(resolved.bits_by_layer) == set(resolved.rates_by_layer) == {n for n, _ in prunable_layers(teacher)}
    names = [n for n, _ in prunable_layers(teacher)]
    assert resolved.bits_by_layer[names[0]] == resolved.bits_by_layer[names[-1]] == 8  # the edges keep their bits
    assert predict_costs(teacher, resolved)["bytes"] <= predict_costs(teacher, uniform)["bytes"]
    student = build_student(teacher, resolved)
    choices = layer_choices(student, cfg, read_sensitivity(probes))  # the uniform config's options
    chosen = {n: (resolved.bits_by_layer[n], resolved.rates_by_layer[n]) for n in choices}
    drop = lambda pick: sum(next(c.drop for c in choices[n] if (c.bits, c.rate) == s) for n, s in pick.items())  # noqa: E731
    assert drop(chosen) <= drop(uniform_settings(student, uniform)) + 1e-9

    for rate in prune_events(resolved).values():
        prune_at(student, resolved, rate)
    apply_quantization(student, resolved, [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))], "ptq")
    save_student(tmp_path, student, resolved, dict(teacher.spec))
    _, payload = load_artifact(tmp_path)
    assert payload["method"]["quant"]["bits_per_layer"] == resolved.bits_by_layer
    assert payload["method"]["allocation"] == "sensitivity"
    sparsity = payload["method"]["prune"]["sparsity_per_layer"]
    assert all(sparsity[n] >= r - 0.01 for n, r in resolved.rates_by_layer.items())  # codes rounding to 0 add zeros
    assert payload["config"]["layer_bits"] == resolved.layer_bits


def test_a_table_of_another_model_is_refused_in_one_line(probes, tmp_path):
    other = build_model("resnet20", 10, 3, 0.25)
    cfg = CompressConfig(bits=4, allocation="sensitivity", sensitivity=probes)
    with pytest.raises(EffrayError, match="no probes of .* run `effray sensitivity`"):
        allocated(other, cfg)
    with pytest.raises(EffrayError, match="no sensitivity.parquet"):
        allocated(convnet(), dataclasses.replace(cfg, sensitivity=str(tmp_path)))
