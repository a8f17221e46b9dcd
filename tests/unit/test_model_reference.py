"""Models by reference (torchvision:, timm:, pkg.module:factory), starting weights and the
trust rule for a file's recorded factory: real torchvision and timm builders at small
sizes, a hand-written residual + depthwise module, real files on disk. No Ray."""

from __future__ import annotations

import pytest
import torch
from helpers import cli, save_checkpoint
from torch import nn

import effray
import effray.compress
import effray.search
import effray.train
from effray.compress.config import CompressRunConfig
from effray.config import from_flags
from effray.errors import EffrayError
from effray.models import build_model, check_model_name
from effray.models.reference import parse_reference, provide
from effray.models.weights import initial_weights, load_weights, read_state_dict
from effray.train.checkpoint import load_checkpoint
from effray.train.config import TrainConfig

VIT = "timm:vit_tiny_patch16_224?img_size=64,depth=2"
USER = "tests.user_models:residual_dw"


def test_a_reference_parses_into_builder_and_literal_arguments():
    ref = parse_reference("timm:vit_tiny_patch16_224?img_size=64,drop_rate=0.1,global_pool='avg',x=(1,2)")
    assert (ref.kind, ref.name, ref.text) == ("timm", "vit_tiny_patch16_224", "timm:vit_tiny_patch16_224")
    assert ref.kwargs == {"img_size": 64, "drop_rate": 0.1, "global_pool": "avg", "x": (1, 2)}
    user = parse_reference("tests.user_models:residual_dw?width=8")
    assert (user.kind, user.module, user.library, user.kwargs) == ("module", "tests.user_models", "tests", {"width": 8})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("torchvision:resnet999", r"torchvision has no classification model 'resnet999'; e\.g\. resnet"),
        ("timm:not_a_net_at_all", r"timm has no model 'not_a_net_at_all'"),
        ("torchvision:", r"no model name after torchvision:"),
        ("3bad:module", r"is not a model reference; use torchvision:NAME"),
        ("resnet999", r"unknown --model 'resnet999'; valid: .*torchvision:NAME"),
        ("timm:vit_tiny_patch16_224?img_size", r"argument 'img_size' is not key=value"),
    ],
)
def test_a_bad_reference_fails_in_one_line_before_anything_runs(name, message):
    with pytest.raises(EffrayError, match=message):
        check_model_name(name)


def test_the_cli_refuses_a_bad_reference_with_exit_2(tmp_path):
    rc, summary, err = cli("--dry-run", "train", "--data", str(tmp_path), "--model", "torchvision:resnet999")
    assert rc == 2 and summary is None and len(err.strip().splitlines()) == 1 and "resnet999" in err


@pytest.mark.parametrize("model", ["torchvision:resnet18", VIT, USER])
def test_pipeline_parallelism_refuses_a_graph_it_cannot_cut_in_one_line(tmp_path, model):
    """Stages are slices of an nn.Sequential of blocks; a referenced model is a graph of its own."""
    args = ("--parallel", "pipeline", "--stages", "2", "--workers", "2", "--microbatches", "2")
    rc, summary, err = cli("--dry-run", "train", "--data", str(tmp_path), "--model", model, *args)
    assert rc == 2 and summary is None and len(err.strip().splitlines()) == 1, err
    assert "is a graph of its own: train it with --parallel ddp" in err


@pytest.mark.parametrize(
    ("name", "head"),
    [("torchvision:resnet18", "fc"), (VIT, "head"), (USER + "?width=8", "fc"), ("tests.user_models:headless", "4")],
)
def test_a_referenced_model_is_built_with_a_head_for_the_datas_classes(name, head):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    assert model.get_submodule(head).out_features == 7
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model.spec["name"] == name.split("?")[0] and model.spec["num_classes"] == 7
    if name.startswith(("torchvision", "timm")):
        assert model.spec["version"] and model.spec["library"] == name.split(":")[0]
    # the spec rebuilds the same architecture
    again = build_model(**model.spec)
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tests.user_models:not_a_model", r"returned a str, not a torch.nn.Module; make it return the model"),
        ("tests.user_models:missing", r"tests.user_models has no 'missing'"),
        ("no_such_pkg_xyz.mod:f", r"can't import no_such_pkg_xyz.mod"),
        ("torchvision:resnet18?bogus=1", r"failed to build \(TypeError: .*\); fix its arguments"),
        ("torch.nn:Identity", r"has no Linear classifier to size to 10 classes"),
    ],
)
def test_a_factory_that_fails_or_returns_no_model_is_one_line(name, message):
    with pytest.raises(EffrayError, match=message):
        build_model(name, num_classes=10)


def test_width_is_for_builtin_models_only():
    with pytest.raises(EffrayError, match=r"--width applies to effray's built-in models"):
        build_model("torchvision:resnet18", 10, width=0.5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_saved_from_one_model_give_identical_logits_in_another(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_model("torchvision:resnet18", 10).eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    torch.manual_seed(2)
    target = build_model("torchvision:resnet18", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(source(x), target(x))
    report = initial_weights(target, str(path))
    assert report["loaded"] == len(state) and report["reinitialised"] == [] and report["unexpected"] == []
    assert report["checksum"].startswith("sha256:")
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_a_head_of_another_size_is_reinitialised_and_said_so():
    imagenet = build_model("torchvision:resnet18", 1000).state_dict()
    model = build_model("torchvision:resnet18", 10)
    report = load_weights(model, {f"module.{k}": v for k, v in imagenet.items()}, "in1k.pt")  # DDP's prefix
    assert report["reinitialised"] == ["fc.weight", "fc.bias"] and report["loaded"] == len(imagenet) - 2
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])


def test_weights_that_do_not_fit_fail_in_one_line(tmp_path):
    model = build_model("torchvision:resnet18", 10)
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(EffrayError, match=r"doesn't fit the model \(\d+ missing, e\.g\. layer4"):
        load_weights(model, partial, "partial.pt")
    pickled = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(EffrayError, match=r"holds more than tensors \(a pickled model\?\); save model.state_dict"):
        read_state_dict(pickled)
    with pytest.raises(EffrayError, match=r"--weights .*nope.pt: no such file"):
        read_state_dict(tmp_path / "nope.pt")


def _checkpoint(tmp_path, name: str) -> tuple:
    torch.manual_seed(0)
    model = build_model(name, 10)
    return model.eval(), save_checkpoint(tmp_path, model)


def test_a_files_own_factory_is_imported_only_when_trusted(tmp_path):
    model, path = _checkpoint(tmp_path, USER + "?width=8")
    with pytest.raises(EffrayError, match=r"model is tests.user_models:residual_dw, code of your own .*--trust-code"):
        load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    for trust in (True, {"tests.user_models"}):
        loaded, payload = load_checkpoint(path, trust_code=trust)
        assert payload["model_spec"]["kwargs"] == {"width": 8}
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    rc, _, err = cli("evaluate", "--checkpoint", str(path), "--data", str(tmp_path))
    assert rc == 2 and "--trust-code" in err and len(err.strip().splitlines()) == 1


def test_a_library_reference_in_a_file_needs_no_trust(tmp_path):
    model, path = _checkpoint(tmp_path, "torchvision:resnet18")
    loaded, payload = load_checkpoint(path)
    assert payload["model_spec"]["library"] == "torchvision"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _notebook_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def test_a_provided_factory_builds_without_an_import_and_is_what_a_file_records(tmp_path):
    ref = provide(_notebook_net)
    assert ref == f"{__name__}:_notebook_net"
    model, path = _checkpoint(tmp_path, ref)
    loaded, _ = load_checkpoint(path)  # handed to this process by the API: no import, no trust needed
    assert loaded[-1].out_features == 10


def test_the_python_api_takes_the_commands_flags_as_keywords():
    assert all(callable(m) for m in (effray.train, effray.compress, effray.search))
    cfg = from_flags(TrainConfig, {"model": VIT, "data": "d", "epochs": 3, "augment": "standard", "weights": "w.pt"})
    assert (cfg.model, cfg.data.data, cfg.epochs, cfg.data.augment, cfg.weights) == (VIT, "d", 3, "standard", "w.pt")
    run = from_flags(
        CompressRunConfig, {"teacher": "t", "data": "d", "out": "o", "student": "torchvision:resnet18", "bits": 4}
    )
    assert (run.compress.student, run.compress.bits) == ("torchvision:resnet18", 4)
    with pytest.raises(EffrayError, match=r"unknown keyword\(s\) epoch; valid: .*epochs"):
        effray.train(model="fastnet", data="d", epoch=3)
    with pytest.raises(EffrayError, match=r"--weights and --pretrained both set the start"):
        effray.train(model="torchvision:resnet18", data="d", weights="w.pt", pretrained=True)
    with pytest.raises(EffrayError, match=r"--parallel pipeline cuts an nn.Sequential"):
        effray.train(model=_notebook_net, data="d", parallel="pipeline")


def test_a_graph_pt2e_cannot_lower_to_int8_is_one_line_and_compress_measures_without_it():
    """torchvision's ResNet calls one ReLU module twice per block, which torchao's x86
    quantizer can't partition: the torch int8 runtime is refused with the reason."""
    from effray.compress.int8 import to_int8

    model = build_model("torchvision:resnet18", 10).eval()
    with pytest.raises(EffrayError, match=r"int8 \(PT2E, x86\): torchao can't quantize this model's graph \(Value"):
        to_int8(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))], max_batches=1)


def test_pretrained_needs_a_library_model_and_weights_exclude_it():
    from effray.models.weights import pretrained_state

    with pytest.raises(EffrayError, match=r"--pretrained needs a torchvision: or timm: --model, not 'resnet20'; pass"):
        pretrained_state("resnet20")
    with pytest.raises(EffrayError, match=r"--student-weights/--student-pretrained start a --student"):
        from_flags(CompressRunConfig, {"teacher": "t", "data": "d", "out": "o", "student_weights": "w.pt"})


def test_pretrained_weights_come_from_the_libraries_own_caches_without_network(tmp_path, monkeypatch):
    """``--pretrained`` asks torchvision (torch hub's cache, then its URL) and timm (the Hugging
    Face hub's cache, then the hub) for their published weights. Files placed where each
    library caches its downloads stand in for a download: the weights load from there, the
    head is re-initialised for the data's classes and said so, and with the hub offline and
    nothing cached timm's refusal is one line naming --weights."""
    import huggingface_hub.constants as hf
    import timm
    import torchvision
    from safetensors.torch import save_file

    from effray.models.weights import pretrained_state

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub reads it on every call
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # read when hf_hub_download is called
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    torch.manual_seed(1)
    published = torchvision.models.resnet18().state_dict()
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(published, tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    loaded = pretrained_state("torchvision:resnet18")
    assert loaded.keys() == published.keys() and all(torch.equal(loaded[k], published[k]) for k in published)
    model = build_model("torchvision:resnet18", 10)
    report = initial_weights(model, pretrained="torchvision:resnet18")
    assert report["source"] == "pretrained:torchvision:resnet18" and sorted(report["reinitialised"]) == [
        "fc.bias",
        "fc.weight",
    ]
    assert torch.equal(model.state_dict()["conv1.weight"], published["conv1.weight"])

    vit = "timm:vit_tiny_patch16_224?img_size=32,patch_size=8,depth=1"
    with pytest.raises(EffrayError, match=r"^--pretrained: .*can't be fetched here .*pass --weights FILE$"):
        pretrained_state(vit)  # offline, nothing cached
    torch.manual_seed(2)
    published = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).state_dict()
    repo = tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file({k: v.contiguous() for k, v in published.items()}, repo / "snapshots" / revision / "model.safetensors")
    loaded = pretrained_state(vit)
    assert loaded.keys() == published.keys() and all(torch.equal(loaded[k], published[k]) for k in published)
