"""The cost-aware searcher: seeded draws from effray's space, configs over budget never
suggested (Optuna told they failed), costs predicted from a real teacher, state that
survives Tune's save/restore."""

from __future__ import annotations

import pytest
import torch
from helpers import save_checkpoint

from effray.compress.config import CompressConfig
from effray.config import to_dict
from effray.errors import EffrayError
from effray.models import build_model
from effray.search.searcher import Budget, CostAwareSearch, CostModel, SpaceSampler, check_feasible, prune_to_latency

SPACE = {
    "prune_kind": {"choice": ["unstructured", "structured"]},
    "prune_rate": {"uniform": [0.2, 0.8]},
    "bits": {"choice": [4, 8, 32]},
    "finetune_lr": {"loguniform": [0.001, 0.1]},
    "finetune_epochs": 2,
}


@pytest.fixture(scope="module")
def costs(tmp_path_factory) -> CostModel:
    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, 0.25)
    path = tmp_path_factory.mktemp("teacher")
    save_checkpoint(path, model)
    teacher = {"macs": 1_000_000, "latency_ms_b1": 2.0}
    return CostModel(str(path), to_dict(CompressConfig(teacher=str(path))), teacher)


def test_sampler_is_seeded_in_range_and_expands_grids():
    a, b = SpaceSampler(SPACE, 3), SpaceSampler(SPACE, 3)
    draws = [a.next() for _ in range(50)]
    assert draws == [b.next() for _ in range(50)]
    assert draws != [SpaceSampler(SPACE, 4).next() for _ in range(50)]
    assert all(0.2 <= d["prune_rate"] <= 0.8 and 0.001 <= d["finetune_lr"] <= 0.1 for d in draws)
    assert {d["bits"] for d in draws} == {4, 8, 32} and all(isinstance(d["bits"], int) for d in draws)
    grid = SpaceSampler(
        {"bits": {"grid": [4, 8]}, "prune_rate": {"grid": [0.3, 0.6]}, "finetune_lr": {"uniform": [0.01, 0.02]}},
        0,
        repeats=2,
    )
    points = [grid.next() for _ in range(8)]
    assert grid.next() is None
    assert sorted((p["bits"], p["prune_rate"]) for p in points) == sorted([(4, 0.3), (4, 0.6), (8, 0.3), (8, 0.6)] * 2)


def test_budget_drops_configs_before_they_run_and_carries_the_predicted_costs(costs):
    limit_kb = 30.0
    search = CostAwareSearch(costs, Budget(max_size_kb=limit_kb), sampler=SpaceSampler(SPACE, 0))
    suggested = [search.suggest(f"t{i}") for i in range(6)]
    assert all(s["predicted"]["bytes"] <= limit_kb * 1024 for s in suggested)
    assert search.rejected > 0
    one = suggested[0]
    assert one["predicted"] == costs(one["compress"])  # cached, the same prediction
    assert one["predicted"]["latency_ms"] == pytest.approx(2.0 * one["predicted"]["macs"] / 1_000_000)
    # MACs and latency budgets use the same predictions
    macs = CostAwareSearch(costs, Budget(max_macs=500_000), sampler=SpaceSampler(SPACE, 1))
    assert all(macs.suggest(f"m{i}")["predicted"]["macs"] <= 500_000 for i in range(3))


def test_an_impossible_budget_fails_in_one_line_before_any_trial(costs):
    with pytest.raises(EffrayError, match="no config of the space fits the budget.*KB > --max-size-kb 0.5"):
        check_feasible(SPACE, costs, Budget(max_size_kb=0.5), seed=0, draws=4)
    check_feasible(SPACE, costs, Budget(), seed=0)  # no budget: nothing to check
    search = CostAwareSearch(costs, Budget(max_size_kb=0.5), sampler=SpaceSampler(SPACE, 0), max_tries=3)
    assert search.suggest("t0") == "FINISHED"


def test_optuna_is_told_rejected_configs_failed_and_resumes_from_its_saved_state(costs, tmp_path):
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    from effray.search.space import to_param_space

    def make() -> CostAwareSearch:
        inner = OptunaSearch(to_param_space(SPACE), metric=["accuracy", "bytes"], mode=["max", "min"], seed=0)
        return CostAwareSearch(costs, Budget(max_size_kb=30.0), inner=inner, constants={"finetune_epochs": 2})

    search = make()
    first = search.suggest("t0")
    assert first["predicted"]["bytes"] <= 30 * 1024
    assert first["compress"]["finetune_epochs"] == 2  # Optuna's space drops constants; the searcher keeps them
    study = search.inner._ot_study
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(told) == search.rejected and all(t.values[0] == 0.0 for t in told)
    search.on_trial_result("t0", {"val_accuracy": 0.3, "epoch": 1})
    search.on_trial_complete("t0", {"val_accuracy": 0.3, "epoch": 1})  # stopped early: pruned, not scored
    assert study.trials[-1].state.name == "PRUNED" or any(t.state.name == "PRUNED" for t in study.trials)
    search.save(str(tmp_path / "searcher.pkl"))
    again = make()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.rejected == search.rejected and len(again.inner._ot_study.trials) == len(study.trials)
    assert again.suggest("t1")["predicted"]["bytes"] <= 30 * 1024


def test_a_structured_config_is_pruned_to_the_latency_target_instead_of_skipped(costs):
    space = {"prune_kind": "structured", "prune_rate": 0.1, "bits": 8}
    target = costs(space)["latency_ms"] * 0.6
    harder = prune_to_latency(space, costs, target)
    assert harder["prune_rate"] > 0.1 and costs(harder)["latency_ms"] <= target
    # the smallest rate that meets it: none below it on a finer grid does
    below = [r / 100 for r in range(10, 96) if r / 100 < harder["prune_rate"] - 1e-3]
    assert below and all(costs({**space, "prune_rate": r})["latency_ms"] > target for r in below)
    assert prune_to_latency({**space, "prune_kind": "unstructured"}, costs, target) is None  # dense kernels: no faster
    assert prune_to_latency(space, costs, 1e-9) is None  # no rate up to 0.95 meets it
    assert prune_to_latency(space, costs, target * 10) == space  # already fast enough: unchanged
    # the search skips it without --prune-to-latency, and suggests it pruned harder with it
    budget = Budget(max_latency_ms=target)
    assert CostAwareSearch(costs, budget, sampler=SpaceSampler(space, 0), max_tries=2).suggest("t0") == "FINISHED"
    fitted = CostAwareSearch(costs, budget, sampler=SpaceSampler(space, 0), fit_latency=True).suggest("t0")
    assert fitted["compress"] == harder and fitted["predicted"]["latency_ms"] <= target
    check_feasible(space, costs, budget, seed=0, fit_latency=True)
    with pytest.raises(EffrayError, match="no config of the space fits the budget"):
        check_feasible(space, costs, budget, seed=0, draws=2)


def test_the_default_search_enumerates_a_grid_space_and_samples_any_other(tmp_path):
    """``--search auto`` (the default): the demo space's grid is enumerated (a random search
    of it would fail once the teacher had trained); a space without grid entries is sampled;
    a searcher that can't enumerate a grid says so in one line."""
    from effray.search.config import TuneConfig
    from effray.search.driver import trial_count
    from effray.search.space import load_space, resolve_search

    demo = load_space("demo")
    assert TuneConfig().search == "auto" and resolve_search("auto", demo) == "grid"
    assert resolve_search("auto", load_space("cifar10")) == "random"
    grid_points = len(SpaceSampler(demo, 0).points)
    assert grid_points == 2 * 2 * 3 == len({tuple(sorted(p.items())) for p in SpaceSampler(demo, 0).points})
    assert trial_count(TuneConfig(space="demo", num_samples=2)) == 2 * grid_points
    assert trial_count(TuneConfig(space="cifar10", num_samples=5)) == 5
    for search in ("random", "optuna"):
        with pytest.raises(EffrayError, match=f"--search {search} can't enumerate"):
            resolve_search(search, demo)
