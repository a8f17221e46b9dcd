"""`effray tune` with `allocation: sensitivity` on local Ray with tiny real data: the search
probes the teacher's layers first (at the space's own bits and rates), each allocated trial
trains the per-layer bits and rates it was given within its uniform twin's bytes, and its
artifact records them."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import yaml
from helpers import cli, trial_rows

from effray.compress.config import parse_layers
from effray.compress.prune import prunable_layers
from effray.train.checkpoint import load_checkpoint, read_payload

SPACE = {
    "allocation": {"grid": ["uniform", "sensitivity"]},
    "prune_kind": "unstructured",
    "prune_rate": 0.5,
    "bits": 4,
    "finetune_epochs": 1,
    "finetune_batch_size": 64,
    "calib_batches": 1,
    "int8": False,
}


def test_a_search_allocates_per_layer_from_its_own_sensitivity_pass(ray_session, tiny_cifar, teacher, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    flags = ["--space", str(space), "--search", "grid", "--num-samples", "1", "--scheduler", "none"]
    common = ["--teacher", str(teacher), "--data", str(tiny_cifar), "--storage", str(tmp_path / "runs")]
    code, summary, err = cli("tune", *common, *flags, "--name", "alloc", "--no-wandb", "--deploy", "off")
    assert code == 0, err
    experiment = tmp_path / "runs" / "alloc"
    probes = pq.read_table(experiment / "sensitivity" / "sensitivity.parquet").to_pylist()
    model, _ = load_checkpoint(teacher)
    layers = [n for n, _ in prunable_layers(model)]
    # the space's 4 bits and rate 0.5 among the stage's own settings, unstructured only
    assert {(r["kind"], r["value"]) for r in probes} == {("bits", b) for b in (2.0, 3.0, 4.0, 6.0, 8.0)} | {
        ("unstructured", r) for r in (0.25, 0.5, 0.75)
    }
    assert {r["layer"] for r in probes} == set(layers)

    configs = {t: json.loads((experiment / t / "params.json").read_text()) for t in trial_rows(experiment)}
    by_kind = {c["compress"]["allocation"]: (t, c) for t, c in configs.items()}
    assert set(by_kind) == {"uniform", "sensitivity"} and summary["trials"] == 2
    _, uniform = by_kind["uniform"]
    trial, allocated = by_kind["sensitivity"]
    assert not uniform["compress"].get("layer_bits")
    bits = parse_layers(allocated["compress"]["layer_bits"], "layer_bits", int)
    rates = parse_layers(allocated["compress"]["layer_rates"], "layer_rates", float)
    assert set(bits) == set(rates) == set(layers)
    assert allocated["compress"]["sensitivity"] == str(experiment / "sensitivity" / "sensitivity.parquet")
    assert allocated["predicted"]["bytes"] <= uniform["predicted"]["bytes"]  # at most its uniform twin's file

    final = next(r for r in trial_rows(experiment)[trial] if r.get("final"))
    method = read_payload(next((experiment / trial).glob("checkpoint_*/model.pt")))["method"]
    assert method["quant"]["bits_per_layer"] == bits and method["allocation"] == "sensitivity"
    assert all(method["prune"]["sparsity_per_layer"][n] >= r - 0.01 for n, r in rates.items())
    assert 0 < final["accuracy"] <= 1

    # the report lays each front model's allocation out per layer (when the allocated trial is on a front)
    code, report, err = cli("report", "--experiment", str(experiment))
    assert code == 0, err
    md = (experiment / "report" / "report.md").read_text()
    assert "config.compress.layer_bits" not in md  # never a cell of the trials' table
    table = pd.read_parquet(experiment / "report" / "results.parquet")
    row = table[table["trial_id"] == trial.removeprefix("trial_")].iloc[0]
    if bool(row.get("pareto_bytes")):
        section = md.split("## Per-layer allocation")[1]
        assert all(f"| {n} | {bits[n]}/{rates[n]:g} |" in section for n in layers)
    else:
        assert "## Per-layer allocation" not in md
