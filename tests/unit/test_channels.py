"""Channel allocation: a structured config's per-layer channel rates chosen from structured
probes under the uniform config's MACs; a coupled group moves as one, the fragile group
keeps its channels, and a table that can't price channels is refused in one line."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import self_labelled

from effray.compress.allocate import Allocator
from effray.compress.channels import allocate_channels, channel_groups, group_choices
from effray.compress.config import CompressConfig
from effray.compress.cost import predict_costs
from effray.compress.knapsack import allocate
from effray.compress.measure import count_macs
from effray.compress.prune import prunable_layers
from effray.compress.sensitivity import Setting, probe_layer, score, with_drops
from effray.compress.steps import build_student, prune_at, prune_events
from effray.config import validated
from effray.errors import EffrayError
from effray.models import build_model
from effray.search.allocation import probe_kinds

pytestmark = pytest.mark.usefixtures("one_thread")


PROBED = ["stem.0", *(f"s{s}b{b}.conv1" for s in (1, 2, 3) for b in (0, 1))]
UNPROBED_BITS = "s1b0.conv2"  # mixed_probes leaves its bits unprobed


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 10, 3, 0.25).eval()


@pytest.fixture(scope="module")
def structured_probes(cifar_parquet, tmp_path_factory) -> str:
    """sensitivity.parquet of a small ResNet-20: the stem (whose group is the first stage's
    residual stream) and six blocks' inner convs at structured rates 0.25 and 0.5, the stem
    at 4 bits too, scored against its own predictions on 128 real images. The other layers
    are not probed (a pass would): channel allocation leaves an unprobed layer whole."""
    model = resnet()
    batches = self_labelled(cifar_parquet, model)
    settings = [Setting("structured", 0.25), Setting("structured", 0.5)]
    rows = probe_layer(model, "stem.0", [Setting("bits", 4.0)], batches)
    rows += [r for n in PROBED for r in probe_layer(model, n, settings, batches)]
    path = tmp_path_factory.mktemp("channels") / "sensitivity.parquet"
    pq.write_table(pa.Table.from_pylist(with_drops(rows, score(model, batches))), path)
    return str(path)


def test_probes_record_the_group_they_cut_and_its_macs(structured_probes):
    rows = pq.read_table(structured_probes).to_pylist()
    groups, dense = channel_groups(rows)
    assert dense == count_macs(resnet(), (3, 32, 32))["macs"]
    stem = next(g for g in groups if "stem.0" in g)
    assert {"s1b0.conv2", "s1b1.conv2", "s1b2.conv2"} <= set(stem)  # the first stage's residual stream
    assert ("s1b0.conv1",) in groups  # a block's inner conv is a group of its own
    for probes in groups.values():
        assert dense > probes[0.25][1] > probes[0.5][1]  # deeper cuts, fewer MACs


def test_the_knapsack_cuts_the_robust_group_and_keeps_the_fragile_one():
    groups = {
        ("a",): {0.5: (5.0, 600)},  # fragile: halving it costs a lot
        ("b", "c"): {0.5: (0.1, 600)},  # robust
    }
    cfg = CompressConfig(prune_kind="structured", prune_rate=0.25)
    choices = group_choices(groups, 1000, cfg)
    need = 300  # MACs to save of 1,000: halving a group saves 400, a quarter 200, so one half or both quarters
    budget = sum(max(c.cost for c in options) for options in choices.values()) - need
    picked = allocate(choices, budget)
    assert picked[("b", "c")].rate == 0.5 and picked[("a",)].rate == 0.0


def test_a_structured_allocation_fits_the_uniform_macs_and_moves_groups_as_one(structured_probes):
    teacher = resnet()
    uniform = validated(CompressConfig(prune_kind="structured", prune_rate=0.1, finetune_epochs=0))
    cfg = dataclasses.replace(uniform, allocation="sensitivity", sensitivity=structured_probes)
    resolved = Allocator(teacher)(cfg)
    assert resolved.allocation == "sensitivity" and not resolved.layer_bits
    rates = resolved.rates_by_layer
    assert set(rates) == {n for n, _ in prunable_layers(teacher)} and rates["head.fc"] == rates["s1b2.conv1"] == 0.0
    groups, _ = channel_groups(pq.read_table(structured_probes).to_pylist())
    for group in groups:
        assert len({rates[n] for n in group}) == 1, group  # coupled layers share one rate
    assert len(set(rates.values())) > 1  # not uniform: the groups got different rates
    predicted = predict_costs(teacher, resolved)["macs"]
    assert predicted <= predict_costs(teacher, uniform)["macs"]
    student = build_student(teacher, resolved)
    for rate in prune_events(resolved).values():
        prune_at(student, resolved, rate, example_inputs=torch.randn(1, 3, 32, 32))
    assert count_macs(student, (3, 32, 32))["macs"] == predicted  # the recipe builds what was priced


def test_tables_that_cannot_price_channels_are_refused_in_one_line(structured_probes):
    rows = pq.read_table(structured_probes).to_pylist()
    cfg = CompressConfig(prune_kind="structured", prune_rate=0.25, allocation="sensitivity", sensitivity="x")
    for bad, words in (
        ([r for r in rows if r["kind"] != "structured"], "no structured probes"),
        ([{k: v for k, v in r.items() if k != "model_macs"} for r in rows], "predates channel allocation"),
        ([{**r, "cut_layers": "nope" if r["cut_layers"] else ""} for r in rows], "layers this model lacks"),
    ):
        with pytest.raises(EffrayError, match=words) as err:
            allocate_channels(resnet(), cfg, resnet(), bad)
        assert "\n" not in str(err.value)


def test_a_search_probes_channels_when_its_space_cuts_them():
    assert probe_kinds({"prune_kind": "structured"}) == "structured"
    assert probe_kinds({"prune_kind": {"choice": ["structured", "unstructured"]}}) == "unstructured,structured"
    assert probe_kinds({"bits": 4}) == "unstructured"


@pytest.fixture(scope="module")
def mixed_probes(structured_probes, cifar_parquet, tmp_path_factory) -> str:
    """The structured table plus every layer but the edges and one conv at 2 and 8 bits."""
    model = resnet()
    batches = self_labelled(cifar_parquet, model)
    layers = [n for n, _ in prunable_layers(model) if n not in ("stem.0", "head.fc", UNPROBED_BITS)]
    bits = [r for n in layers for r in probe_layer(model, n, [Setting("bits", 2.0), Setting("bits", 8.0)], batches)]
    rows = pq.read_table(structured_probes).to_pylist() + with_drops(bits, score(model, batches))
    path = tmp_path_factory.mktemp("mixed") / "sensitivity.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_a_structured_allocation_then_spends_the_uniform_bytes_on_bits_per_layer(structured_probes, mixed_probes):
    """Channels within the uniform config's MACs, then bits per layer of the cut model within
    its bytes: both budgets hold on the recipe's own path, the edges keep their 8 bits, a
    layer whose bits were never probed keeps the config's, and the probed ones are traded.
    A table of channel probes only leaves the bits uniform."""
    teacher = resnet()
    uniform = validated(CompressConfig(prune_kind="structured", prune_rate=0.25, bits=4, finetune_epochs=0))
    cfg = dataclasses.replace(uniform, allocation="sensitivity", sensitivity=mixed_probes)
    resolved = Allocator(teacher)(cfg)
    assert resolved.allocation == "sensitivity" and resolved.layer_rates and resolved.layer_bits
    bits = resolved.bits_by_layer
    assert bits["stem.0"] == 8 and bits["head.fc"] == 8  # --first-layer-bits / --last-layer-bits stand
    assert bits[UNPROBED_BITS] == 4  # never probed at other bits
    assert set(bits.values()) - {4, 8}, bits  # the probed ones moved
    ours, theirs = predict_costs(teacher, resolved), predict_costs(teacher, cfg)  # the uniform config, as recorded
    assert ours["bytes"] <= theirs["bytes"] and ours["macs"] <= theirs["macs"]
    channels_only = Allocator(teacher)(dataclasses.replace(cfg, sensitivity=structured_probes))
    assert channels_only.layer_rates == resolved.layer_rates and not channels_only.layer_bits


TORCHVISION_PROBED = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1", "layer4.1.conv2"]


def test_a_torchvision_resnet18_gets_channels_then_bits_per_layer_within_both_budgets(cifar_parquet, tmp_path):
    """The worked example's student, a torchvision ResNet-18 (no weights file: any
    ``nn.Module``), probed on a few layers: its channel allocation moves each coupled group
    as one (the stem's group is the first stage's residual stream, ``layer4.1.conv2``'s the
    last stage's), its bits per layer are traded after the cut, the edges keep 8 bits,
    and the recipe builds what was priced within the uniform config's MACs and bytes."""
    torch.manual_seed(0)
    teacher = build_model("torchvision:resnet18", 10).eval()
    batches = self_labelled(cifar_parquet, teacher, images=64)
    channels = [Setting("structured", 0.25), Setting("structured", 0.5)]
    bits = [Setting("bits", 2.0), Setting("bits", 8.0)]
    rows = [r for n in TORCHVISION_PROBED for r in probe_layer(teacher, n, channels, batches)]
    rows += [r for n in TORCHVISION_PROBED[1:] for r in probe_layer(teacher, n, bits, batches)]
    table = tmp_path / "sensitivity.parquet"
    pq.write_table(pa.Table.from_pylist(with_drops(rows, score(teacher, batches))), table)
    groups, _ = channel_groups(pq.read_table(table).to_pylist())
    stem = next(g for g in groups if "conv1" in g)
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= set(stem)  # the residual stream the stem feeds
    last = next(g for g in groups if "layer4.1.conv2" in g)
    assert {"layer4.0.conv2", "layer4.0.downsample.0"} <= set(last)  # the last stage's, its shortcut conv too

    uniform = validated(CompressConfig(prune_kind="structured", prune_rate=0.25, bits=4, finetune_epochs=0))
    cfg = dataclasses.replace(uniform, allocation="sensitivity", sensitivity=str(table))
    resolved = Allocator(teacher)(cfg)
    assert resolved.allocation == "sensitivity" and resolved.layer_rates and resolved.layer_bits
    rates, layer_bits = resolved.rates_by_layer, resolved.bits_by_layer
    for group in groups:
        assert len({rates[n] for n in group}) == 1, group  # coupled layers share one rate
    assert layer_bits["conv1"] == layer_bits["fc"] == 8  # --first-layer-bits / --last-layer-bits stand
    assert layer_bits["layer2.1.conv1"] == 4  # never probed at other bits: the config's
    ours, theirs = predict_costs(teacher, resolved), predict_costs(teacher, cfg)
    assert ours["bytes"] <= theirs["bytes"] and ours["macs"] <= theirs["macs"]
    student = build_student(teacher, resolved)
    for rate in prune_events(resolved).values():
        prune_at(student, resolved, rate, example_inputs=torch.randn(1, 3, 32, 32))
    assert count_macs(student, (3, 32, 32))["macs"] == ours["macs"]  # the recipe builds what was priced
