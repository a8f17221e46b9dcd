"""GPU rules that need no GPU to check: whole GPUs per NCCL worker, RNG state for the
worker's own device only, and the collate step that keeps a rank's rows on the host."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from effray.errors import EffrayError


@pytest.mark.parametrize("workers,gpus,ok", [
    (2, 0.5, False), (4, 0.25, False), (2, 1.5, False),  # two NCCL ranks on one GPU, or a split GPU
    (2, 1.0, True), (4, 2.0, True), (2, 0.0, True),      # whole GPUs, or CPUs
    (1, 0.5, True),                                      # one rank: nobody to share a GPU with
])  # fmt: skip
def test_nccl_workers_need_whole_gpus(workers, gpus, ok):
    from effray.data.pipeline import DataConfig
    from effray.train.config import TrainConfig
    from effray.train.run import check_resources

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
    from effray.compress.run import CompressRunConfig
    from effray.synth.config import SynthTrainConfig
    from effray.train.run import check_resources

    cluster = {"CPU": 64.0, "GPU": 64.0}
    for cfg in (CompressRunConfig(workers=2, gpus_per_worker=0.5), SynthTrainConfig(workers=2, gpus_per_worker=0.5)):
        with pytest.raises(EffrayError, match="NCCL"):
            check_resources(cfg, cluster, [cluster])


def test_tune_refuses_a_split_gpu_per_trial_worker():
    from effray.search.run import TuneConfig, check_trial_resources

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

    batch = {"image": np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3),
             "label": np.arange(6, dtype=np.int64), "index": np.array([10, 11, 12, 13, 14, 15])}  # fmt: skip
    out = ToModelInput(rows=(1, 3))(batch)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (2, 2, 2, 3)
    assert out["index"].tolist() == [10, 13]  # index % 3 == 1
    assert out["label"].tolist() == [0, 3]
    assert ToModelInput()(batch)["image"].shape == (6, 2, 2, 3)
