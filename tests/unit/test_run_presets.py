"""``effray run``'s presets: built-in ones and YAML files, every stage's config built and
checked before any stage runs (``--dry-run`` prints them), and the resource requests of a
preset checked against a Ray cluster launcher config. No Ray: nothing here starts a stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli

from effray.cluster import bundles_that_fit, fit_problems, launcher_node_types
from effray.errors import EffrayError
from effray.run import PRESETS, RunConfig, load_preset, plan_stages, resource_requests

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _write(tmp_path: Path, text: str, name: str = "preset.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_yaml_preset_is_its_base_with_the_files_settings_on_top(tmp_path):
    spec = _write(tmp_path, "base: demo\ntrain:\n  epochs: 3\n  data: {augment: strong}\ntune:\n  num_samples: 2\n")
    plan = plan_stages(RunConfig(preset=spec, out=str(tmp_path / "run")))
    assert (plan.train.epochs, plan.train.data.augment, plan.tune.num_samples) == (3, "strong", 2)
    demo = PRESETS["demo"]
    assert (
        plan.train.model == demo["train"]["model"] and plan.train.width == demo["train"]["width"]
    )  # kept from the base
    assert plan.prepare.limit == demo["prepare"]["limit"] and plan.tune.scheduler == "pareto"
    assert plan.tune.teacher == str(tmp_path / "run" / "teacher" / "teacher") and plan.train.data.data == str(
        tmp_path / "run" / "data"
    )
    assert load_preset("demo") == demo and load_preset("demo") is not demo  # a copy: the built-in stays as it is


def test_a_preset_without_base_starts_from_the_configs_defaults(tmp_path):
    plan = plan_stages(RunConfig(preset=_write(tmp_path, "train:\n  epochs: 2\n"), out=str(tmp_path / "run")))
    assert plan.train.epochs == 2 and plan.tune.space == "demo" and plan.prepare.limit == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: demo\ntrain:\n  epoch: 3\n", r"train: unknown TrainConfig key\(s\) epoch"),
        ("base: demo\ntrain:\n  epochs: -1\n", r"train: --epochs must be a positive integer"),
        ("base: demo\ntune:\n  space: nospace\n", r"tune: --space 'nospace' is neither a preset"),
        # the demo's space is a grid: a random search of it fails here, not after the teacher has trained
        (
            "base: demo\ntune:\n  search: random\n",
            r"tune: the space has grid entries, which --search random can't enumerate",
        ),
        ("train: [1\n", r"not valid YAML"),
        ("base: big\n", r"base 'big' is not a built-in preset"),
        ("teacher:\n  epochs: 3\n", r"unknown section\(s\) teacher"),
        ("- 1\n- 2\n", r"expected a mapping"),
    ],
)
def test_a_bad_preset_fails_in_one_line_before_anything_runs(tmp_path, text, message):
    spec, out = _write(tmp_path, text), tmp_path / "run"
    with pytest.raises(EffrayError, match=message):
        RunConfig(preset=spec, out=str(out)).validate()
    rc, summary, err = cli("--dry-run", "run", "--preset", spec, "--out", str(out))
    assert rc == 2 and summary is None and len(err.strip().splitlines()) == 1 and spec in err
    assert not out.exists()


def test_an_unknown_preset_name_names_the_choices(tmp_path):
    with pytest.raises(
        EffrayError, match=r"neither a built-in preset \(demo, cifar10, imagenette-resnet50\) nor a YAML file"
    ):
        RunConfig(preset="cifar100", out=str(tmp_path)).validate()


def test_dry_run_prints_every_stage_and_its_resources():
    rc, summary, err = cli(
        "--dry-run",
        "run",
        "--preset",
        "cifar10",
        "--source",
        "s3://bucket/cifar10.parquet",
        "--out",
        "/mnt/effray/cifar10",
        "--cluster-config",
        str(CLUSTER_YAML),
    )
    assert rc == 0, err
    plan = summary["plan"]
    assert plan["train"]["workers"] == 4 and plan["train"]["gpus_per_worker"] == 1.0 and plan["prepare"]["limit"] == 0
    assert plan["tune"]["gpus_per_trial"] == 1.0 and plan["tune"]["data"] == "/mnt/effray/cifar10/data"
    assert plan["resources"]["the teacher's workers"] == {"bundle": {"CPU": 4.0, "GPU": 1.0}, "copies": 4}


def test_the_cifar10_preset_fits_the_shipped_cluster_yaml():
    nodes = launcher_node_types(CLUSTER_YAML)
    assert nodes == {"head.cpu": ({"CPU": 8.0}, 1), "worker.gpu": ({"CPU": 4.0, "GPU": 1.0}, 8)}
    requests = resource_requests(plan_stages(RunConfig(preset="cifar10", source="s3://b/c.parquet", out="/mnt/e")))
    assert fit_problems(requests, nodes) == []
    assert bundles_that_fit({"CPU": 4.0, "GPU": 1.0}, nodes) == 8 and bundles_that_fit({"CPU": 1.0}, nodes) == 40


def test_a_preset_too_big_for_the_cluster_is_refused(tmp_path):
    spec = _write(tmp_path, "base: cifar10\ntrain:\n  workers: 16\ntune:\n  cpus_per_trial: 6.0\n")
    with pytest.raises(
        EffrayError,
        match=r"doesn't fit .*cluster.yaml: the teacher's workers needs 16 x \(4 CPU, 1 GPU\) "
        r"on one node each; the cluster holds 8 at most; a search trial needs 1 x "
        r"\(6 CPU, 1 GPU\) .* holds 0 at most",
    ):
        RunConfig(preset=spec, source="s3://b/c.parquet", out="/mnt/e", cluster_config=str(CLUSTER_YAML)).validate()


def test_a_launcher_config_without_resources_is_refused(tmp_path):
    spec = _write(tmp_path, "available_node_types:\n  head:\n    resources: {}\nhead_node_type: head\n", "c.yaml")
    with pytest.raises(EffrayError, match=r"node type head states no resources.CPU"):
        launcher_node_types(spec)


def test_the_worked_example_preset_validates_at_full_size_and_fits_the_cluster(tmp_path):
    """``imagenette-resnet50``, shipped as YAML: a torchvision ResNet-50 teacher on Imagenette,
    a ResNet-18 student in the search; ``--source`` wins over the preset's own."""
    rc, summary, err = cli(
        "--dry-run",
        "run",
        "--preset",
        "imagenette-resnet50",
        "--cluster-config",
        str(CLUSTER_YAML),
        "--out",
        str(tmp_path / "run"),
    )
    assert rc == 0, err
    plan = summary["plan"]
    train, tune = plan["train"], plan["tune"]
    assert (train["model"], train["workers"], train["gpus_per_worker"]) == ("torchvision:resnet50", 4, 1.0)
    assert train["data"]["augment"].startswith("random_resized_crop(224,") and "grayscale" in train["data"]["augment"]
    assert plan["prepare"]["image_size"] == 224
    assert plan["prepare"]["source"].endswith("imagenette-train.parquet") and tune["space"] == "imagenette-resnet18"
    plan = plan_stages(RunConfig(preset="imagenette-resnet50", source="other.parquet", out=str(tmp_path / "r")))
    assert plan.prepare.source == "other.parquet" and plan.tune.trust_code
    assert not (tmp_path / "run").exists()
