"""The GPU paths for real, on local Ray: skipped where ``torch.cuda.is_available()`` is
false (every CI machine so far). ``bench/gpu_check.sh`` runs this file first on a GPU box:
``.venv/bin/python -m pytest -q -m cuda tests/cuda``.

What the fake-CUDA suite (tests/fake_cuda) cannot show, these do: real NCCL, real kernels,
the host-sync guard of the CUDA runtime itself (``torch.cuda.set_sync_debug_mode``), the
structured pruner's channel choice, and whole commands with their GPUs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cli, two_trial_tune

from effray.models import build_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")


# ------------------------------------------------------------------ in-process, the CUDA runtime's own check


def _uint8_batch(n: int = 64) -> dict[str, torch.Tensor]:
    return {
        "image": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device="cuda"),
        "label": torch.randint(0, 10, (n,), device="cuda"),
    }


def test_training_step_never_syncs():
    """Three loop steps under ``set_sync_debug_mode("error")``: the CUDA runtime raises on
    any synchronising call (``.item()``, pageable copies, ``nonzero``...)."""
    from effray.data.images import channel_stats, normalize_tensor
    from effray.train.step import Schedule, param_groups, soft_cross_entropy, train_step
    from effray.train.strategy import DDPStrategy

    strategy = DDPStrategy(torch.device("cuda", 0), channels_last=True, compile=False, amp=True)
    with torch.cuda.device(0):
        model = build_model("resnet20", 10).to("cuda", memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("onecycle", 10, 2))
        stats = channel_stats([0.5] * 3, [0.25] * 3, torch.device("cuda", 0))
        sums = torch.zeros(2, dtype=torch.float64, device="cuda")
        batches = [_uint8_batch() for _ in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for b in batches:
                b = {**b, "image": normalize_tensor(b["image"], *stats, True)}
                train_step(strategy, model, opt, sched, b, lambda y, bb: soft_cross_entropy(y, bb, 0.1), sums)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert float(sums[1]) == 3 * 64 and torch.isfinite(sums[0])


def test_structured_pruning_on_a_cuda_model():
    from effray.compress.prune import channel_counts, prune_step

    model = build_model("resnet20", 10, 3, 0.5).cuda()
    before = sum(channel_counts(model))
    prune_step(model, 0.3, "structured", "l1")
    assert sum(channel_counts(model)) < before
    assert model(torch.randn(4, 3, 32, 32, device="cuda")).shape == (4, 10)
    assert all(p.is_cuda for p in model.parameters())


def test_checkpoint_rng_is_the_workers_own_gpu():
    from effray.train.checkpoint import rng_state, set_rng_state

    dev = torch.device("cuda", 0)
    state = rng_state(dev)
    a = torch.rand(4, device=dev)
    set_rng_state(state, dev)
    assert torch.equal(a, torch.rand(4, device=dev))
    assert torch.is_tensor(state["cuda"])  # one device's state, not a list of every GPU's


# ------------------------------------------------------------------ commands on local Ray

TRAIN = [
    "--model",
    "resnet20",
    "--width",
    "0.5",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--augment",
    "standard",
    "--gpus-per-worker",
    "1",
    "--cpus-per-worker",
    "1",
    "--no-wandb",
]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("augment_on", ["cpu", "gpu"])
def test_train_ddp_on_one_gpu(tiny_cifar, tmp_path, augment_on):
    rc, result, err = cli(
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--workers",
        "1",
        "--augment-on",
        augment_on,
        "--storage",
        str(tmp_path),
        "--name",
        f"gpu-{augment_on}",
    )
    assert rc == 0, err[-3000:]
    assert result["epoch"] == 2 and result["val_count"] == 60 and result["val_accuracy"] > 0.1
    rc, ev, err = cli("evaluate", "--checkpoint", result["checkpoint"], "--data", str(tiny_cifar))
    assert rc == 0, err[-2000:]


@needs_two
@pytest.mark.usefixtures("ray_session")
def test_train_ddp_on_every_gpu_with_nccl(tiny_cifar, tmp_path):
    rc, result, err = cli(
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--workers",
        str(GPUS),
        "--storage",
        str(tmp_path),
        "--name",
        "gpu-all",
    )
    assert rc == 0, err[-3000:]
    assert result["val_count"] == 60


@needs_two
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_on_two_gpus(tiny_cifar, tmp_path, schedule):
    rc, result, err = cli(
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--workers",
        "2",
        "--parallel",
        "pipeline",
        "--stages",
        "2",
        "--microbatches",
        "4",
        "--pipeline-schedule",
        schedule,
        "--storage",
        str(tmp_path),
        "--name",
        f"pipe-{schedule}",
    )
    assert rc == 0, err[-3000:]
    assert result["val_count"] == 60 and result["val_accuracy"] > 0.1


@pytest.mark.usefixtures("ray_session")
def test_compress_on_a_gpu(tiny_cifar, teacher, tmp_path):
    rc, result, err = cli(
        "compress",
        "--teacher",
        str(teacher),
        "--data",
        str(tiny_cifar),
        "--out",
        str(tmp_path / "a"),
        "--prune-rate",
        "0.5",
        "--bits",
        "4",
        "--kd-alpha",
        "0.5",
        "--finetune-epochs",
        "2",
        "--finetune-batch-size",
        "64",
        "--calib-batches",
        "2",
        "--workers",
        "1",
        "--gpus-per-worker",
        "1",
    )
    assert rc == 0, err[-3000:]
    assert result["bytes"] > 0 and 0 <= result["accuracy"] <= 1


@pytest.mark.usefixtures("ray_session")
def test_tune_trials_use_their_gpus(tiny_cifar, teacher, tmp_path):
    rc, result, err = two_trial_tune(tmp_path, teacher, tiny_cifar, "gpu", "--gpus-per-trial", "1")
    assert rc == 0, err[-3000:]
    assert result["finished"] == 2


@pytest.mark.usefixtures("ray_session")
def test_gan_epoch_on_a_gpu(tiny_cifar, tmp_path):
    rc, result, err = cli(
        "synth",
        "train",
        "--data",
        str(tiny_cifar),
        "--out",
        str(tmp_path / "gan"),
        "--epochs",
        "1",
        "--gen-width",
        "8",
        "--disc-width",
        "8",
        "--z-dim",
        "16",
        "--batch-size",
        "32",
        "--workers",
        "1",
        "--gpus-per-worker",
        "1",
    )
    assert rc == 0, err[-3000:]
    assert result["epochs"] == 1
