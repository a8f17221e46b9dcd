"""The training recipe's pieces without Ray: schedule, weight-decay groups, loss, config,
resource checks, run names, the wandb mode decision and the numerics (bf16, channels-last)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from effray.config import from_dict, to_dict
from effray.data.pipeline import DataConfig
from effray.errors import EffrayError
from effray.models import build_model
from effray.tracking import decide_wandb_mode, stable_run_id
from effray.train.config import TrainConfig, default_run_name
from effray.train.step import Schedule, param_groups, soft_cross_entropy
from effray.train.trainer import check_resources


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
def test_schedule_warms_up_to_the_peak_then_decays_to_zero(kind):
    s = Schedule(kind, total_steps=100, warmup_steps=10)
    lrs = [s(t) for t in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.0) and s(500) == pytest.approx(0.0)  # steps past the estimate clamp
    assert Schedule(kind, 100, 0)(0) == pytest.approx(1.0)


def test_scheduler_state_survives_a_weights_only_checkpoint():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("cosine", 50, 5))
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, Schedule("cosine", 50, 5))
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    assert sched2.last_epoch == 7 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_no_weight_decay_on_norms_and_biases():
    model = build_model("resnet20", num_classes=10, width=0.5)
    decay, no_decay = param_groups(model, 5e-4)
    bn_and_bias = [
        p
        for m in model.modules()
        for p in m.parameters(recurse=False)
        if isinstance(m, torch.nn.BatchNorm2d) or p.ndim == 1
    ]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in bn_and_bias} and no_decay["weight_decay"] == 0
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_soft_targets_match_hard_labels_and_mix_linearly():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    hard = soft_cross_entropy(logits, {"label": labels}, 0.1)
    soft = soft_cross_entropy(logits, {"label": labels, "target": F.one_hot(labels, 10).float()}, 0.1)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
    assert hard.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())


def _cfg(**kw) -> TrainConfig:
    return from_dict(TrainConfig, {**to_dict(TrainConfig(data=DataConfig(data="/d"))), **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"model": "vgg99"}, "unknown --model 'vgg99'; valid: airbench, convnet"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"workers": -1}, "--workers must be a positive integer"),
        ({"batch_size": 100, "workers": 3}, "multiple of --workers"),
        ({"warmup_epochs": 20}, "--warmup-epochs"),
        ({"lr_end": 1.5}, "--lr-start and --lr-end"),
        ({"whiten_bias_epochs": -1}, "--whiten-bias-epochs"),
        ({"name": "../escape"}, "--name"),
        ({"inject_failure_at_epoch": 99}, "--inject-failure-at-epoch"),
        ({"parallel": "zero3"}, None),  # argparse enforces choices; a dict with it still validates
    ],
)
def test_bad_configs_are_one_line_errors(kw, message):
    if message is None:
        _cfg(**kw)
        return
    with pytest.raises(EffrayError, match=message.replace("(", r"\(")):
        _cfg(**kw)


def test_run_name_is_deterministic_and_ignores_what_doesnt_change_the_result():
    base = _cfg()
    assert default_run_name(base) == default_run_name(_cfg())
    assert default_run_name(base).startswith("fastnet-")
    assert default_run_name(_cfg(max_failures=5, wandb_project="x", storage="/elsewhere")) == default_run_name(base)
    assert default_run_name(_cfg(lr=0.3)) != default_run_name(base)
    assert default_run_name(_cfg(data={"data": "/d", "cache_decoded": False})) == default_run_name(
        _cfg(data={"data": "/d"})
    )
    assert default_run_name(_cfg(data={"data": "/d", "augment": "flip"})) != default_run_name(_cfg(data={"data": "/d"}))
    assert _cfg().seed == 0 and _cfg(data={"data": "/d", "seed": 4}).seed == 4
    assert stable_run_id("/runs", "a") == stable_run_id("/runs/", "a") != stable_run_id("/runs", "b")


def test_resource_check_refuses_what_the_cluster_can_never_hold():
    cfg = _cfg(workers=2, cpus_per_worker=1.0, data_cpus=1.0)
    check_resources(cfg, {"CPU": 3.0}, [{"CPU": 3.0}])
    with pytest.raises(EffrayError, match="needs 3 CPUs, the cluster has 2"):
        check_resources(cfg, {"CPU": 2.0}, [{"CPU": 2.0}])
    with pytest.raises(EffrayError, match="needs 4 GPUs, the cluster has 2"):
        check_resources(_cfg(gpus_per_worker=2), {"CPU": 8.0, "GPU": 2.0}, [{"CPU": 8.0, "GPU": 2.0}])
    with pytest.raises(EffrayError, match="no node has 4 CPUs"):
        check_resources(_cfg(cpus_per_worker=4.0), {"CPU": 10.0}, [{"CPU": 2.0}] * 5)


@pytest.mark.parametrize(
    "requested, env, disabled, want",
    [
        ("auto", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, False, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, False, "online"),
        ("auto", {"WANDB_MODE": "dryrun"}, False, "offline"),
        ("online", {}, False, "online"),
        ("online", {}, True, "disabled"),
        ("disabled", {"WANDB_API_KEY": "k"}, False, "disabled"),
    ],
)
def test_wandb_mode_decision(requested, env, disabled, want):
    assert decide_wandb_mode(requested, env, disabled=disabled) == want


def test_wandb_without_a_key_goes_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert decide_wandb_mode("auto", {}) == "offline"


def test_on_device_augmentation_is_seeded_per_rank_and_step_and_normalises():
    from effray.data.augment import augment_on_device, parse_policy
    from effray.data.images import channel_stats

    torch.manual_seed(0)
    batch = {"image": torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), "label": torch.arange(8) % 10}
    cpu = torch.device("cpu")
    policy, meta = parse_policy("crop(4)|flip|mixup(0.4)", 10), channel_stats([0.5] * 3, [0.25] * 3, cpu)
    a, b = (augment_on_device(dict(batch), policy, meta, cpu, (0, 1, 0, 5)) for _ in range(2))
    other_rank = augment_on_device(dict(batch), policy, meta, cpu, (0, 1, 1, 5))
    assert a["image"].shape == (8, 3, 32, 32) and a["image"].dtype == torch.float32
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    assert not torch.equal(a["image"], other_rank["image"])
    assert a["target"].shape == (8, 10) and torch.allclose(a["target"].sum(1), torch.ones(8))
    assert torch.isfinite(soft_cross_entropy(torch.randn(8, 10), a, 0.1))


def test_numerics_follow_the_hardware(monkeypatch):
    from effray.hardware import bf16_native
    from effray.train.parallel import make_strategy

    cpu = torch.device("cpu")
    picked = make_strategy("ddp", cpu, channels_last=True, compile=False, amp=True)
    assert picked.numerics() == {"bf16": bf16_native(cpu), "channels_last": True}
    assert not make_strategy("ddp", cpu, channels_last=False, compile=False, amp=False).numerics()["bf16"]
    model, x = build_model("convnet", 10, width=0.25), torch.randn(4, 3, 32, 32)
    with picked.autocast():
        assert model(x).dtype == (torch.bfloat16 if bf16_native(cpu) else torch.float32)
    # a CPU without native bf16 math (where emulated bf16 is slower than fp32) trains in fp32
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert not bf16_native(cpu)
    assert make_strategy("ddp", cpu, channels_last=True, compile=False, amp=True).numerics()["bf16"] is False


@pytest.mark.parametrize("bf16", [False, True])
def test_evaluation_repeats_the_numerics_training_scored_with(one_thread, bf16):
    """`effray evaluate` must reproduce the accuracy and loss training reported, so it
    scores with the checkpoint's numerics (bf16 autocast runs on any CPU, just slower)."""
    import numpy as np

    from effray.data.images import normalize_tensor
    from effray.evaluate import score
    from effray.train.strategy import Strategy

    torch.manual_seed(0)
    model = build_model("airbench", 10, width=0.25).eval()
    strategy = Strategy(torch.device("cpu"), channels_last=True, compile=False, amp=False)
    strategy.amp = bf16  # as training resolved it on a bf16 machine, or not
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    want = strategy.predict(model.to(memory_format=torch.channels_last), normalize_tensor(images, mean, std))
    got = score(model, [(images.numpy(), labels.numpy())], mean, std, 10, 32, numerics=strategy.numerics())
    assert got["accuracy"] == float((want.argmax(1) == labels).float().mean())
    assert abs(got["loss"] - float(F.cross_entropy(want, labels))) <= 1e-6
    strategy.amp = False
    fp32 = strategy.predict(model, normalize_tensor(images, mean, std))
    assert torch.allclose(want, fp32, rtol=0, atol=1e-5) != bf16  # the numerics matter: bf16 rounds
    assert np.isfinite(got["loss"])


def test_cpus_per_worker_auto_fits_the_cluster_it_finds():
    from effray.train.trainer import fit_cpus_per_worker

    auto = _cfg(workers=2, data_cpus=1.0)
    assert auto.cpus_per_worker == 0.0  # "auto", as the config stores it
    laptop = fit_cpus_per_worker(auto, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert laptop.cpus_per_worker == 0.5
    check_resources(laptop, {"CPU": 2.0}, [{"CPU": 2.0}])  # what failed before on a 2-core laptop
    # several nodes: no worker asks for more than one node holds; quarter CPUs
    assert (
        fit_cpus_per_worker(auto, {"CPU": 33.0}, [{"CPU": 1.0}, {"CPU": 16.0}, {"CPU": 16.0}]).cpus_per_worker == 16.0
    )
    assert (
        fit_cpus_per_worker(
            _cfg(workers=3, batch_size=384, data_cpus=1.0), {"CPU": 8.0}, [{"CPU": 8.0}]
        ).cpus_per_worker
        == 2.25
    )
    # GPUs: the scarcest GPU node's CPUs per GPU, times a worker's GPUs
    gpus = fit_cpus_per_worker(
        _cfg(workers=4, gpus_per_worker=1.0),
        {"CPU": 48.0, "GPU": 6.0},
        [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}],
    )
    assert gpus.cpus_per_worker == 8.0
    assert (
        fit_cpus_per_worker(_cfg(workers=2, cpus_per_worker=3.0), {"CPU": 2.0}, []).cpus_per_worker == 3.0
    )  # given: kept
    with pytest.raises(EffrayError, match="leave no CPU"):
        fit_cpus_per_worker(_cfg(workers=2, data_cpus=1.0), {"CPU": 1.0}, [{"CPU": 1.0}])


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
def test_schedule_starts_and_ends_where_asked(kind):
    s = Schedule(kind, total_steps=100, warmup_steps=23, start=0.2, end=0.07)  # airbench's
    assert s(0) == pytest.approx(0.2) and s(23) == pytest.approx(1.0) and s(100) == pytest.approx(0.07)
    assert min(s(t) for t in range(101)) == pytest.approx(0.07)
    old = Schedule(kind, 100, 10)
    del old.start, old.end  # a schedule restored from a checkpoint written before the knobs
    assert old(0) == pytest.approx(0.1) and old(100) == pytest.approx(0.0)
