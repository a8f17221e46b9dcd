"""The trial context: what the driver builds once and every trial receives through Ray's
pickling, rebuilding each trial's CompressConfig from its Tune sample."""

from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle

from effray.compress.config import CompressConfig
from effray.errors import EffrayError
from effray.search.config import TuneConfig
from effray.search.constraints import Constraints
from effray.search.context import TeacherBaseline, TrialContext, TrialWorkers, corruption_score
from effray.search.resources import DRIVER_CPUS, concurrency, trial_resources
from effray.train.validate import CorruptionScore


def _context(experiment: str = "/runs/tune/search") -> TrialContext:
    return TrialContext(
        name="search",
        storage="/runs/tune",
        experiment=experiment,
        data="/data/tiny",
        data_info={"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3},
        augment="standard",
        seed=3,
        eval_batch_size=64,
        base=CompressConfig(teacher="/runs/teacher/model.pt"),
        teacher=TeacherBaseline(path="/runs/teacher/model.pt", metrics={"accuracy": 0.5, "bytes": 1000}, info={}),
        robust=CorruptionScore(corruptions=("gaussian_noise",), severities=(1, 3), images=20, seed=3),
        workers=TrialWorkers(count=2, cpus_per_worker=0.5, gpus_per_worker=0.0, data_cpus=1.0),
        wandb_project="effray",
        wandb_mode="offline",
    )


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_the_context_survives_pickling_and_stays_frozen(dumps):
    ctx = _context()
    again = pickle.loads(dumps(ctx))
    assert again == ctx and again.teacher.metrics == {"accuracy": 0.5, "bytes": 1000}
    with pytest.raises(AttributeError):
        again.seed = 4


def test_a_trials_config_is_the_base_with_its_sample_validated():
    ctx = _context()
    cfg = ctx.compress_config({"bits": 4, "prune_rate": 0.5})
    assert isinstance(cfg, CompressConfig) and cfg.bits == 4 and cfg.prune_rate == 0.5
    assert cfg.teacher == "/runs/teacher/model.pt"  # from the base
    assert ctx.base == CompressConfig(teacher="/runs/teacher/model.pt")  # the base is untouched
    with pytest.raises(EffrayError):
        ctx.compress_config({"bits": 9})
    with pytest.raises(EffrayError, match="unknown"):
        ctx.compress_config({"no_such_field": 1})


def test_trial_paths_and_names_are_deterministic():
    ctx = _context()
    assert ctx.local and ctx.trial_dir("ab12") == "/runs/tune/search/trial_ab12"
    assert ctx.run_name("ab12") == "search-ab12"
    cloud = _context("s3://bucket/tune/search")
    assert not cloud.local and cloud.trial_dir("ab12") == "s3://bucket/tune/search/trial_ab12"


def test_the_tune_config_names_the_experiment_and_its_robustness():
    cfg = TuneConfig(storage="runs/tune/", name="x", robust_images=0)
    assert cfg.experiment.endswith("runs/tune/x") and cfg.storage_root.startswith("/")
    assert TuneConfig(storage="s3://b/tune/", name="x").experiment == "s3://b/tune/x"
    assert corruption_score(cfg) is None
    robust = corruption_score(TuneConfig(robust_corruptions="gaussian_noise", robust_severities="3,1", seed=2))
    assert robust == CorruptionScore(corruptions=("gaussian_noise",), severities=(1, 3), images=200, seed=2)
    assert not robust.every_epoch  # only a limit on it makes every epoch pay for the score
    held = corruption_score(TuneConfig(limits=Constraints(max_corruption_drop=5.0)))
    assert held.every_epoch and held.images == 200


def test_what_a_trial_reserves_and_how_many_run_at_once():
    one = TuneConfig(cpus_per_trial=1.0)
    assert trial_resources(one) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(TuneConfig(workers_per_trial=2, cpus_per_trial=1.0)) == {"cpu": DRIVER_CPUS}
    assert concurrency(one, {"CPU": 4.0}, shared=True) == 4
    assert concurrency(one, {"CPU": 4.0}, shared=False) == 3  # one CPU left for the streams
    assert concurrency(TuneConfig(cpus_per_trial=1.0, gpus_per_trial=1.0), {"CPU": 8.0, "GPU": 2.0}, True) == 2
    assert concurrency(TuneConfig(max_concurrent=5), {"CPU": 1.0}, shared=True) == 5
