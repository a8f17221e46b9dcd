"""GPU rules that need no GPU to check: whole GPUs per NCCL worker, RNG state for the
worker's own device only, and the collate step that keeps a rank's rows on the host."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from effray.errors import EffrayError


@pytest.mark.parametrize(
    "workers,gpus,ok",
    [
        (2, 0.5, False),
        (4, 0.25, False),
        (2, 1.5, False),  # two NCCL ranks on one GPU, or a split GPU
        (2, 1.0, True),
        (4, 2.0, True),
        (2, 0.0, True),  # whole GPUs, or CPUs
        (1, 0.5, True),  # one rank: nobody to share a GPU with
    ],
)
def test_nccl_workers_need_whole_gpus(workers, gpus, ok):
    from effray.data.pipeline import DataConfig
    from effray.train.config import TrainConfig
    from effray.train.trainer import check_resources

    cfg = TrainConfig(data=DataConfig(data="d"), workers=workers, gpus_per_worker=gpus)
    cluster = {"CPU": 64.0, "GPU": 64.0}
    if ok:
        cfg.validate()
        check_resources(cfg, cluster, [cluster])
        return
    for check in (cfg.validate, lambda: check_resources(cfg, cluster, [cluster])):  # at parse time, and on the cluster
        with pytest.raises(EffrayError, match="NCCL") as err:
            check()
        assert "\n" not in str(err.value) and "--gpus-per-worker 1" in str(err.value)


def test_compress_and_gan_configs_are_checked_the_same_way():
    from effray.compress.config import CompressRunConfig
    from effray.synth.config import SynthTrainConfig
    from effray.train.trainer import check_resources

    cluster = {"CPU": 64.0, "GPU": 64.0}
    for cfg in (CompressRunConfig(workers=2, gpus_per_worker=0.5), SynthTrainConfig(workers=2, gpus_per_worker=0.5)):
        with pytest.raises(EffrayError, match="NCCL"):
            check_resources(cfg, cluster, [cluster])


def test_tune_refuses_a_split_gpu_per_trial_worker():
    from effray.search.config import TuneConfig
    from effray.search.resources import check_trial_resources

    cluster = {"CPU": 64.0, "GPU": 64.0}
    with pytest.raises(EffrayError, match="whole GPUs"):
        check_trial_resources(TuneConfig(workers_per_trial=2, gpus_per_trial=3.0), cluster, [cluster])
    check_trial_resources(TuneConfig(workers_per_trial=2, gpus_per_trial=4.0), cluster, [cluster])


def test_rng_state_holds_no_gpu_state_for_a_cpu_worker():
    from effray.train.checkpoint import rng_state, set_rng_state

    assert "cuda" not in rng_state(torch.device("cpu")) and "cuda" not in rng_state()
    torch.manual_seed(3)
    random.seed(3)
    state = rng_state(torch.device("cpu"))
    a = (torch.rand(3), random.random())
    # an older checkpoint's list of every GPU's state is ignored on a CPU worker
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]}, torch.device("cpu"))
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_collate_keeps_uint8_and_picks_a_ranks_rows_on_the_host():
    from effray.data.pipeline import ToModelInput

    batch = {
        "image": np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3),
        "label": np.arange(6, dtype=np.int64),
        "index": np.array([10, 11, 12, 13, 14, 15]),
    }
    out = ToModelInput(rows=(1, 3))(batch)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (2, 2, 2, 3)
    assert out["index"].tolist() == [10, 13]  # index % 3 == 1
    assert out["label"].tolist() == [0, 3]
    assert ToModelInput()(batch)["image"].shape == (6, 2, 2, 3)


def test_accumulated_step_equals_one_step_over_the_whole_batch():
    """An elastic run on fewer workers takes its bigger share in micro-batches of the full
    world's size: the gradients (and so the step) equal one forward over the whole batch."""
    from effray.train.step import soft_cross_entropy, train_step
    from effray.train.strategy import DDPStrategy

    torch.manual_seed(0)
    batch = {"image": torch.randn(30, 3, 8, 8), "label": torch.randint(0, 10, (30,)), "index": torch.arange(30)}
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    strategy = DDPStrategy(torch.device("cpu"), channels_last=False, compile=False, amp=False)
    grads, losses = [], []
    for model, micro in zip(models, (None, 8)):  # whole; 8 + 8 + 8 + 6 rows
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        sums = torch.zeros(2, dtype=torch.float64)
        train_step(strategy, model, opt, sched, batch, lambda y, b: soft_cross_entropy(y, b, 0.1), sums, micro)
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(sums.clone())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert losses[1][1] == 30


def test_workers_min_max_is_elastic_and_keeps_the_global_batch_whole():
    from effray.cli import main

    assert (
        main(["--dry-run", "train", "--data", "d", "--storage", "/tmp/s", "--workers", "2-4", "--batch-size", "96"])
        == 0
    )
    assert (
        main(["--dry-run", "train", "--data", "d", "--storage", "/tmp/s", "--workers=2-3", "--batch-size", "64"]) == 2
    )
    assert (
        main(
            [
                "--dry-run",
                "train",
                "--data",
                "d",
                "--storage",
                "/tmp/s",
                "--workers",
                "2-4",
                "--parallel",
                "pipeline",
                "--batch-size",
                "96",
            ]
        )
        == 2
    )
    from effray.data.pipeline import DataConfig
    from effray.train.config import TrainConfig

    cfg = TrainConfig(data=DataConfig(data="d"), workers=2, max_workers=4, batch_size=96)
    cfg.validate()
    assert cfg.elastic and list(cfg.world_sizes) == [2, 3, 4] and cfg.micro_batch == 24
    assert not TrainConfig(data=DataConfig(data="d"), workers=2).elastic


def test_worker_resources_must_be_offered_by_some_node():
    from effray.compress.config import CompressRunConfig
    from effray.data.pipeline import DataConfig
    from effray.train.config import TrainConfig
    from effray.train.trainer import check_resources

    cluster = {"CPU": 8.0}
    cfg = TrainConfig(data=DataConfig(data="d"), workers=2, worker_resources="trainer=1")
    with pytest.raises(EffrayError, match="no node offers --worker-resources trainer=1"):
        check_resources(cfg, cluster, [cluster])
    check_resources(cfg, cluster, [{**cluster, "trainer": 2.0}])
    check_resources(CompressRunConfig(workers=2), cluster, [cluster])  # configs without the flag pass
    with pytest.raises(EffrayError, match="name=amount"):
        TrainConfig(data=DataConfig(data="d"), worker_resources="CPU=2").validate()


def test_a_frozen_whitening_bias_stays_put_while_the_rest_trains():
    """--whiten-bias-epochs: past it the stem's bias gets no step, momentum or decay
    included, although DDP-style gradients for it were computed."""
    from effray.models import build_model
    from effray.models.airbench import whitening_biases
    from effray.train.step import param_groups, soft_cross_entropy, train_step
    from effray.train.strategy import DDPStrategy

    torch.manual_seed(0)
    model = build_model("airbench", 10, 3, 0.25).train()
    (bias,) = whitening_biases(model)
    strategy = DDPStrategy(torch.device("cpu"), channels_last=False, compile=False, amp=False)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = {"image": torch.randn(16, 3, 32, 32), "label": torch.randint(0, 10, (16,))}
    loss = lambda y, b: soft_cross_entropy(y, b, 0.1)  # noqa: E731
    sums = torch.zeros(2, dtype=torch.float64)
    train_step(strategy, model, opt, sched, batch, loss, sums)  # while it trains
    trained = bias.detach().clone()
    assert trained.abs().sum() > 0 and bias in opt.state
    head = model.head.fc.weight.detach().clone()
    for _ in range(2):
        train_step(strategy, model, opt, sched, batch, loss, sums, frozen=(bias,))
    torch.testing.assert_close(bias.detach(), trained, rtol=0, atol=0)  # momentum would have moved it on
    moved = [p for p in model.parameters() if p.requires_grad and p is not bias]
    assert moved and all(p.grad is not None for p in moved)
    assert not torch.equal(head, model.head.fc.weight)
