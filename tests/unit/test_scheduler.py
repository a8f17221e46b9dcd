"""ParetoASHA's decisions on hand-built rung histories, with real Tune trials (no cluster)."""

from __future__ import annotations

import functools
import json
import math
import pickle

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from effray.errors import EffrayError
from effray.search.scheduler import ParetoASHA, dominates, nondominated_fronts

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


@functools.cache
def trial(tid: str) -> Trial:
    return Trial("__fake", trial_id=tid, stub=True)  # stub: no registered trainable needed


def report(s, tid, epoch, acc, nbytes, epochs=10, **extra):
    """One epoch report the way the compression trial sends it, costs included."""
    result = {"val_accuracy": acc, "predicted_bytes": nbytes, "epoch": epoch, "epochs": epochs}
    return s.on_trial_result(None, trial(tid), {**result, "final": False, **extra})


def test_dominated_trial_is_stopped_at_its_rung():
    s = ParetoASHA()
    assert report(s, "a", 1, 0.90, 100) == CONTINUE  # alone at the rung
    assert report(s, "b", 1, 0.80, 200) == STOP  # less accurate and bigger
    assert s.stopped["b"] == {
        "rung": 1,
        "rank": 2,
        "rung_size": 2,
        "kept": 1,
        "dominated_by": ["a"],
        "val_accuracy": 0.80,
        "predicted_bytes": 200,
        "epoch": 1,
    }
    assert list(s.stopped) == ["b"] and s.rungs_reached("b") == [1]


def test_cheaper_less_accurate_trial_is_kept_where_asha_stops_it():
    history = [("a", 0.90, 40_000), ("b", 0.80, 4_000)]  # b: the small end of the front
    pareto = ParetoASHA()
    asha = ASHAScheduler(
        metric="val_accuracy",
        mode="max",
        time_attr="epoch",
        max_t=100,
        grace_period=1,
        reduction_factor=3,
    )
    decisions = {"pareto": [], "asha": []}
    for tid, acc, nbytes in history:
        asha.on_trial_add(None, trial(tid))
        decisions["pareto"].append(report(pareto, tid, 1, acc, nbytes))
        decisions["asha"].append(report(asha, tid, 1, acc, nbytes))
    assert decisions == {"pareto": [CONTINUE, CONTINUE], "asha": [CONTINUE, STOP]}
    assert pareto.stopped == {}


@pytest.mark.parametrize("epoch,epochs", [(1, 1), (3, 3), (4, 3)])
def test_trial_on_its_last_epoch_is_never_stopped(epoch, epochs):
    s = ParetoASHA()
    report(s, "a", epoch, 0.90, 100)
    # dominated, but its final report is next
    assert report(s, "b", epoch, 0.50, 900, epochs=epochs) == CONTINUE
    assert s.stopped == {} and s.spared["b"]["dominated_by"] == ["a"]
    # the same point with an epoch to go
    assert report(s, "c", epoch, 0.50, 900, epochs=epoch + 1) == STOP


def test_final_report_continues_and_is_not_recorded():
    s = ParetoASHA()
    report(s, "a", 1, 0.90, 100)
    # no predicted_bytes, no epochs: the measured artifact, not an epoch
    final = {"val_accuracy": 0.10, "epoch": 3, "final": True, "bytes": 9_999}
    assert s.on_trial_result(None, trial("b"), final) == CONTINUE
    assert s.rungs_reached("b") == [] and s.stopped == {}


def test_a_ray_train_trials_closing_report_is_not_an_epoch():
    """A --workers-per-trial trial's workers end with one more report (``finetuned``: their
    last validation under ``final_`` names, no tail scores): the scheduler lets it pass
    rather than ask it for the floors' scores."""
    s = ParetoASHA(floors={"val_worst_class_recall": 0.5})
    report(s, "a", 1, 0.90, 100, val_worst_class_recall=0.8)
    closing = {"val_accuracy": 0.90, "epoch": 11, "finetuned": True, "predicted_bytes": 100, "epochs": 10}
    assert s.on_trial_result(None, trial("a"), closing) == CONTINUE
    assert s.rungs_reached("a") == [1] and s.stopped == {}


def test_accuracy_within_the_margin_of_a_cheaper_trial_is_not_dominated():
    s = ParetoASHA(acc_margin=0.005)
    report(s, "cheap", 1, 0.900, 100)
    assert report(s, "close", 1, 0.897, 200) == CONTINUE  # 0.003 behind: noise
    assert report(s, "far", 1, 0.890, 200) == STOP  # 0.010 behind
    assert s.stopped["far"]["dominated_by"] == ["cheap", "close"]  # close is 0.007 ahead of it
    strict = ParetoASHA(acc_margin=0.0)
    report(strict, "cheap", 1, 0.900, 100)
    assert report(strict, "close", 1, 0.897, 200) == STOP


def test_exact_ties_never_dominate_each_other():
    s = ParetoASHA(acc_margin=0.0)
    assert [report(s, t, 1, 0.9, 100) for t in "abc"] == [CONTINUE] * 3
    assert nondominated_fronts({"a": [0.9, 100], "b": [0.9, 100]}) == [["a", "b"]]


def test_first_front_is_kept_whole_even_when_larger_than_the_quota():
    s = ParetoASHA(reduction_factor=3)
    front = [("a", 0.90, 400), ("b", 0.85, 300), ("c", 0.80, 200), ("d", 0.75, 100)]
    # the quota, ceil(n / 3), is at most 2 < 4: the whole first front stays anyway
    assert [report(s, t, 1, acc, b) for t, acc, b in front] == [CONTINUE] * 4
    assert report(s, "e", 1, 0.70, 500) == STOP
    assert s.stopped["e"]["rank"] == 2 and s.stopped["e"]["kept"] == 4
    assert s.stopped["e"]["dominated_by"] == ["a", "b", "c", "d"]


def test_later_fronts_are_added_whole_until_the_quota_is_met():
    s = ParetoASHA(reduction_factor=2, acc_margin=0.0)
    assert report(s, "a", 1, 0.90, 100) == CONTINUE
    assert report(s, "b", 1, 0.80, 300) == STOP  # n=2, quota 1: F1 = {a} suffices
    assert report(s, "d", 1, 0.60, 400) == STOP  # n=3, quota 2: {a} + {b}; d is in F3
    assert s.stopped["d"]["rank"] == 3
    assert s.stopped["d"]["dominated_by"] == ["a", "b"]  # from F1 and F2
    # n=4, quota 2: F1 = {a} is short, so F2 = {b, c} comes in whole (3 kept); c is dominated by a yet kept
    assert report(s, "c", 1, 0.70, 200) == CONTINUE
    assert nondominated_fronts(s.recorded(1), 0.0) == [["a"], ["b", "c"], ["d"]]


def test_dominated_trial_inside_the_kept_fraction_continues():
    s = ParetoASHA(reduction_factor=1.5)  # quota ceil(2 / 1.5) = 2: both stay
    report(s, "a", 1, 0.90, 100)
    assert report(s, "b", 1, 0.80, 200) == CONTINUE


def test_fewer_than_min_rung_size_trials_stop_nobody():
    s = ParetoASHA(min_rung_size=3)
    assert report(s, "a", 1, 0.90, 100) == CONTINUE
    assert report(s, "b", 1, 0.50, 900) == CONTINUE  # dominated, but only 2 at the rung
    assert report(s, "c", 1, 0.40, 1000) == STOP
    assert s.stopped["c"]["rung_size"] == 3 and s.stopped["c"]["dominated_by"] == ["a", "b"]


def test_rungs_are_judged_once_and_skipped_rungs_are_not_backfilled():
    s = ParetoASHA(grace_period=1, reduction_factor=3)  # rungs 1, 3, 9, ...
    assert report(s, "b", 1, 0.85, 200) == CONTINUE
    assert report(s, "b", 2, 0.10, 200) == CONTINUE  # no new rung: not judged again
    assert report(s, "a", 4, 0.90, 100) == CONTINUE  # first report past 1 and 3: recorded at 3 only
    assert s.rungs_reached("a") == [3]
    assert report(s, "b", 5, 0.80, 200) == STOP  # b reached rung 3 at epoch 5, dominated by a there
    assert s.stopped["b"]["rung"] == 3 and s.stopped["b"]["epoch"] == 5
    assert s.rungs_reached("b") == [1, 3] and s.recorded(1) == {"b": [0.85, 200]}


def test_stop_log_names_rung_rank_and_dominating_trials(tmp_path):
    path = tmp_path / "logs" / "stops.json"
    s = ParetoASHA(log_path=str(path))
    report(s, "a", 1, 0.90, 100)
    report(s, "b", 1, 0.95, 50)
    assert not path.exists()  # nothing stopped yet
    report(s, "c", 1, 0.80, 200)
    report(s, "d", 1, 0.70, 300)
    log = json.loads(path.read_text())
    assert list(log) == ["c", "d"]
    assert log["c"]["rung"] == 1 and log["c"]["rank"] == 3
    assert log["c"]["dominated_by"] == ["b", "a"]  # F1 first, then F2
    assert log["d"] == s.stopped["d"] and log["d"]["rank"] == 4 and log["d"]["rung_size"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["stops.json"]  # no temp files left


def test_pickle_round_trip_mid_history_makes_the_same_decisions(tmp_path):
    s = ParetoASHA(log_path=str(tmp_path / "stops.json"))
    for tid, acc, b in [("a", 0.90, 400), ("b", 0.80, 100), ("c", 0.70, 500)]:
        report(s, tid, 1, acc, b)
    report(s, "a", 3, 0.92, 400)
    copy = pickle.loads(pickle.dumps(s))
    s.save(str(tmp_path / "sched.pkl"))
    restored = ParetoASHA()
    restored.restore(str(tmp_path / "sched.pkl"))
    later = [("b", 3, 0.85, 100), ("d", 1, 0.60, 600), ("e", 1, 0.95, 50), ("f", 3, 0.71, 500)]
    runs = [[report(x, tid, ep, acc, b) for tid, ep, acc, b in later] for x in (s, copy, restored)]
    assert runs[0] == [CONTINUE, STOP, CONTINUE, STOP]
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert copy.stopped == s.stopped == restored.stopped and set(s.stopped) == {"c", "d", "f"}
    assert copy.debug_string() == s.debug_string()


@pytest.mark.parametrize("missing", ["predicted_bytes", "val_accuracy", "epoch", "epochs"])
def test_missing_key_raises_a_value_error_naming_it(missing):
    s = ParetoASHA()
    result = {"val_accuracy": 0.9, "predicted_bytes": 100, "epoch": 1, "epochs": 10}
    del result[missing]
    with pytest.raises(ValueError, match=f"needs {missing!r} in"):
        s.on_trial_result(None, trial("a"), result)


def test_a_second_cost_and_nan_accuracy():
    s = ParetoASHA(costs=("predicted_bytes", "macs"))
    assert report(s, "a", 1, 0.9, 100, macs=5e6) == CONTINUE
    assert report(s, "b", 1, 0.8, 200, macs=1e6) == CONTINUE  # fewer MACs: not dominated
    assert report(s, "c", 1, math.nan, 300, macs=6e6) == STOP  # diverged and costlier: ranks last
    r = {"epoch": 1, "epochs": 10}
    with pytest.raises(ValueError, match="'macs'"):
        s.on_trial_result(None, trial("d"), {**r, "val_accuracy": 0.9, "predicted_bytes": 100})


def test_cost_tolerance_and_its_cycles():
    assert dominates([0.91, 104], [0.90, 100], 0.005, cost_rtol=0.05)  # 4% bigger: within tolerance
    assert not dominates([0.91, 104], [0.90, 100], 0.005, cost_rtol=0.0)
    # equal accuracy, each a little better on one cost: with tolerance each dominates the other
    pts = {"a": [0.9, 100, 200], "b": [0.9, 101, 199], "c": [0.5, 300, 300]}
    assert dominates(pts["a"], pts["b"], 0.0, 0.05) and dominates(pts["b"], pts["a"], 0.0, 0.05)
    # a and b are caught in a cycle and c behind it: one last front rather than lost
    assert nondominated_fronts(pts, 0.0, 0.05) == [["a", "b", "c"]]


def test_tune_interface():
    s = ParetoASHA()
    assert s.set_search_properties(None, None)
    assert s.set_search_properties("val_accuracy", "max", config={})
    assert not s.set_search_properties("val_loss", "min")
    assert not s.set_search_properties(None, "min")
    assert s.metric == "val_accuracy"
    report(s, "a", 1, 0.9, 100)
    report(s, "b", 1, 0.8, 200)
    s.on_trial_complete(None, trial("b"), {"val_accuracy": 0.8, "epoch": 1, "final": False})
    s.on_trial_remove(None, trial("a"))
    # finished and removed trials still count
    assert s.recorded(1) == {"a": [0.9, 100], "b": [0.8, 200]}
    assert "stopped 1" in s.debug_string() and "1: 2" in s.debug_string()
    with pytest.raises(ValueError, match="reduction_factor"):
        ParetoASHA(reduction_factor=1)


def test_ray_asha_stops_a_trial_after_its_last_epoch_and_the_safe_one_does_not():
    """The bug the issue saw: Ray's ASHA judged a trial at a rung that was its last epoch,
    after it had paid for all its training, and discarded it before its final measurement."""
    from effray.search.scheduler import LastEpochSafeASHA

    kwargs = {
        "metric": "val_accuracy",
        "mode": "max",
        "time_attr": "epoch",
        "max_t": 100,
        "grace_period": 1,
        "reduction_factor": 2,
    }
    plain, safe = ASHAScheduler(**kwargs), LastEpochSafeASHA(**kwargs)
    for s in (plain, safe):
        for tid in ("long", "short", "later"):
            s.on_trial_add(None, trial(tid))
    decisions = {}
    for name, s in (("plain", plain), ("safe", safe)):
        first = report(s, "long", 1, 0.70, 100, epochs=4)
        last = report(s, "short", 1, 0.60, 100, epochs=1)  # worse at rung 1, which is its last epoch
        decisions[name] = (first, last)
    assert decisions == {"plain": (CONTINUE, STOP), "safe": (CONTINUE, CONTINUE)}
    # before its last epoch the safe one decides as ASHA does
    assert report(safe, "later", 1, 0.50, 100, epochs=3) == report(plain, "later", 1, 0.50, 100, epochs=3) == STOP


def test_a_trial_that_can_no_longer_reach_the_accuracy_floor_is_stopped_once_a_finished_trial_says_so():
    s = ParetoASHA(floors={"val_accuracy": 0.80}, acc_margin=0.0, min_rung_size=99)  # the fronts stop nobody here
    assert report(s, "a", 1, 0.50, 100, epochs=3) == CONTINUE  # no finished trial yet: no headroom known
    assert s.headroom(1) is None
    assert report(s, "a", 3, 0.70, 100, epochs=3) == CONTINUE  # a's last epoch: it gained 0.20 from rung 1
    assert s.headroom(1) == pytest.approx(0.20)
    assert report(s, "b", 1, 0.65, 50) == CONTINUE  # 0.65 + 0.20 reaches 0.80
    assert report(s, "c", 1, 0.55, 10) == STOP  # 0.55 + 0.20 can't
    assert s.stopped["c"]["reason"] == "below the accuracy floor" and s.stopped["c"]["floor"] == 0.80
    assert s.stopped["c"]["headroom"] == pytest.approx(0.20) and "val_accuracy floor 0.8000" in s.debug_string()
    # a trial on its last epoch still goes on to its final measurement
    assert report(s, "d", 1, 0.10, 10, epochs=1) == CONTINUE and "d" in s.spared
    # the floor survives a pickle round trip, as the rest of the state does
    again = pickle.loads(pickle.dumps(s))
    assert report(again, "e", 1, 0.55, 10) == STOP and report(again, "f", 1, 0.61, 10) == CONTINUE


def test_a_trial_whose_worst_class_can_no_longer_reach_its_floor_is_stopped():
    """--max-worst-class-drop's floor, judged like the accuracy one on the score's own
    headroom: an accurate trial whose rarest class collapsed is stopped."""
    s = ParetoASHA(floors={"val_accuracy": 0.5, "val_worst_class_recall": 0.40}, acc_margin=0.0, min_rung_size=99)
    tail = "val_worst_class_recall"
    assert report(s, "a", 1, 0.80, 100, epochs=3, **{tail: 0.30}) == CONTINUE
    assert report(s, "a", 3, 0.85, 100, epochs=3, **{tail: 0.45}) == CONTINUE  # +0.05 accuracy, +0.15 worst class
    assert s.headroom(1) == pytest.approx(0.05) and s.headroom(1, tail) == pytest.approx(0.15)
    assert report(s, "b", 1, 0.90, 50, **{tail: 0.30}) == CONTINUE  # 0.30 + 0.15 reaches 0.40
    assert report(s, "c", 1, 0.90, 10, **{tail: 0.20}) == STOP  # 0.20 + 0.15 can't, however accurate
    assert s.stopped["c"]["reason"] == "below the val_worst_class_recall floor"
    assert s.stopped["c"][tail] == 0.20 and s.stopped["c"]["floor"] == 0.40
    with pytest.raises(EffrayError, match="val_worst_class_recall"):  # a trial must report what is floored
        report(s, "d", 1, 0.90, 10)


def test_a_trial_whose_ece_can_no_longer_get_below_its_ceiling_is_stopped():
    """--max-ece's ceiling, the floors' rule the other way up: the headroom is the most a
    finished trial's ECE fell from the rung to its last epoch."""
    ece = "val_ece_scaled"
    s = ParetoASHA(ceilings={ece: 0.05}, acc_margin=0.0, min_rung_size=99)
    assert report(s, "a", 1, 0.80, 100, epochs=3, **{ece: 0.10}) == CONTINUE  # nothing finished: no headroom
    assert report(s, "a", 3, 0.85, 100, epochs=3, **{ece: 0.04}) == CONTINUE  # fell 0.06 from rung 1
    assert s.headroom(1, ece) == pytest.approx(0.06)
    assert report(s, "b", 1, 0.90, 50, **{ece: 0.11}) == CONTINUE  # 0.11 - 0.06 gets to 0.05
    assert report(s, "c", 1, 0.90, 10, **{ece: 0.20}) == STOP  # 0.20 - 0.06 can't, however accurate
    assert s.stopped["c"]["reason"] == "above the val_ece_scaled ceiling" and s.stopped["c"]["ceiling"] == 0.05
    assert "val_ece_scaled ceiling 0.0500" in s.debug_string()
    assert report(s, "d", 1, 0.90, 10, **{ece: float("nan")}) == STOP  # no score: the worst one


def test_without_a_floor_the_headroom_stops_nobody():
    s = ParetoASHA(min_rung_size=99)
    report(s, "a", 1, 0.5, 100, epochs=3)
    report(s, "a", 3, 0.9, 100, epochs=3)
    assert report(s, "b", 1, 0.01, 10) == CONTINUE and not s.stopped
