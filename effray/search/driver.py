"""``effray tune``'s driver: the Tuner over the compression space, started or resumed.

The experiment lives at ``--storage``/``--name``, a deterministic place, so running the
same command again resumes it: finished trials are kept, errored ones are retried, and
the searcher's and scheduler's state come back with Tune's. Before any trial the driver
checks that one can be placed, measures the teacher once (:mod:`effray.search.context`)
and, when they fit, puts the decoded splits in the object store
(:mod:`effray.search.splits`). Everything is chosen on val; once the trials are done, the
teacher and the front are scored on the test split (:mod:`effray.search.holdout`). Trials
on shared arrays run in reused worker processes (torch imported, kernels warm).

Tracking (wandb, offline without a key) is decided once, here: every trial is its own
run (:mod:`effray.search.trial`), and at the end the summary (results table, Pareto
plot, best rows) is one more run in the experiment's group (``job_type="summary"``).
The terminal stays quiet: Tune's own output is off and progress is the caller's
callbacks' (``effray run``'s bar).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from effray.atomic import write_json
from effray.config import require, to_dict
from effray.console import say
from effray.data.pipeline import validate_data_dir
from effray.errors import EffrayError
from effray.search.aggregate import ReportConfig, report
from effray.search.allocation import with_sensitivity
from effray.search.config import METRIC, TuneConfig
from effray.search.context import TrialContext, trial_context
from effray.search.deployed import DeployProbe, deploy_probe
from effray.search.holdout import score_test_split
from effray.search.resources import check_trial_resources, concurrency, trial_resources
from effray.search.results import STOPPED_FILE, TEACHER_FILE
from effray.search.scheduler import LastEpochSafeASHA, ParetoASHA
from effray.search.searcher import Budget, CostAwareSearch, CostModel, SpaceSampler, check_feasible
from effray.search.space import load_space, resolve_search, to_param_space
from effray.search.splits import share_splits, shares_data
from effray.search.trial import compression_trial
from effray.tracking import TrackerSettings, decide_wandb_mode, stable_run_id

log = logging.getLogger(__name__)
# --objective -> the report field the pareto scheduler ranks a rung by
SCHEDULER_COSTS = {"bytes": "predicted_bytes", "macs": "predicted_macs", "latency": "predicted_latency_ms"}


def tune_compression(cfg: TuneConfig, callbacks: list[Any] | None = None, stop: Any = None) -> dict[str, Any]:
    """Run (or resume) the search; returns the experiment path and a summary. ``callbacks``:
    Tune callbacks on the driver (``effray run``'s progress bar); ``stop``: a Tune stopper
    (the search benchmark's compute budget)."""
    import ray

    meta = validate_data_dir(cfg.data)
    space = load_space(cfg.space)
    cfg = dataclasses.replace(cfg, search=resolve_search(cfg.search, space))
    check_trial_resources(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    w = cfg.workers_per_trial
    require(
        w == 1 or meta["counts"]["train"] >= w,
        f"{meta['counts']['train']} training rows can't feed {w} workers per trial",
    )
    mode = decide_wandb_mode(cfg.wandb_mode, {}, disabled=not cfg.wandb)  # the CLI decides from its env first
    corrupted = f", {cfg.robust_images} val images under corruptions" if cfg.robust_images else ""
    say(f"[effray] search: measuring the teacher (accuracy, calibration, latency{corrupted}) ...")
    context = with_deploy_probe(cfg, trial_context(cfg, meta, mode))
    try:
        return _search(cfg, space, meta, context, callbacks, stop)
    finally:
        if context.deploy is not None:
            context.deploy.close()


def with_deploy_probe(cfg: TuneConfig, context: TrialContext) -> TrialContext:
    """The context with the search's deployment ready (``--deploy``: the runtime checked, the
    targets found, the teacher exported and timed on each) and the teacher's figures on that
    runtime among its metrics: ``latency_ms`` (every report's latency column) becomes the
    deployed one, the eager module's kept as ``eager_latency_ms``."""
    spec = cfg.deploy_spec
    if spec is None:
        return dataclasses.replace(context, objective=cfg.objective)
    where = os.path.join(cfg.experiment, "deploy-teacher") if context.local else tempfile.mkdtemp(prefix="effray-")
    say(f"[effray] search: exporting the teacher and timing it as deployed (--deploy {cfg.deploy}) ...")
    probe: DeployProbe = deploy_probe(spec, context.teacher.path, context.data, where)
    if cfg.deploy != "auto" and probe.teacher.get("deploy_why"):  # auto's choice is said beside the table
        log.warning("--deploy %s: %s", cfg.deploy, probe.teacher["deploy_why"])
    metrics = {
        **context.teacher.metrics,
        **probe.teacher,
        "latency_ms": probe.teacher["deployed_latency_ms_b1"],
        "eager_latency_ms": context.teacher.metrics.get("latency_ms_b1"),
    }
    teacher = dataclasses.replace(context.teacher, metrics=metrics)
    return dataclasses.replace(context, deploy=probe, objective=cfg.objective, teacher=teacher)


def _search(
    cfg: TuneConfig,
    space: dict[str, Any],
    meta: dict[str, Any],
    context: TrialContext,
    callbacks: list[Any] | None,
    stop: Any,
) -> dict[str, Any]:
    """The Tuner started (or restored) and run; the summary."""
    from ray import tune

    path, w, mode = cfg.experiment, cfg.workers_per_trial, context.wandb_mode
    shares = shares_data(cfg, meta)
    shared = share_splits(cfg.data) if shares else None
    trainable = tune.with_resources(
        tune.with_parameters(compression_trial, context=context, shared=shared), trial_resources(cfg)
    )
    resumed = tune.Tuner.can_restore(path)
    if resumed:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, space, context, trainable, shares, list(callbacks or []), stop)
    if context.local:  # cloud storage: the trials' own results carry the ratios
        write_json(Path(path) / TEACHER_FILE, context.teacher.metrics)
    grid = tuner.fit()
    summary = _results(grid, path, resumed, w, shares, context.teacher.metrics)
    if context.local and summary["measured"]:  # chosen on val, estimated on test (a local experiment's artifacts)
        summary["test"] = score_test_split(
            path,
            cfg.data,
            meta,
            context.teacher.path,
            context.teacher.metrics,
            cfg.eval_batch_size,
            cfg.trust_code,
            cfg.limits,
        )
    if mode != "disabled":
        run = _summary_run(cfg, mode, context.teacher.metrics)
        summary["wandb"] = {
            "mode": mode,
            "project": cfg.wandb_project,
            "group": cfg.name,
            "summary_run_id": run["run_id"] if run else None,
        }
        if run:
            summary["report"] = run["report"]
    return summary


def _new_tuner(
    cfg: TuneConfig,
    space: dict[str, Any],
    context: TrialContext,
    trainable: Any,
    shares: bool,
    callbacks: list[Any],
    stop: Any,
) -> Any:
    """A fresh experiment under ``cfg.experiment``. The cost-aware searcher owns the space
    (each suggestion carries its predicted costs), so the Tuner gets no ``param_space``."""
    import ray
    from ray import tune

    space = with_sensitivity(cfg, space)  # allocation: sensitivity probes the teacher's layers first
    teacher = context.teacher
    costs = CostModel(teacher.path, to_dict(context.base), teacher.metrics, teacher.info, context.data_info)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            num_samples=trial_count(cfg, space),
            search_alg=_searcher(cfg, space, costs),
            scheduler=_scheduler(
                cfg, cfg.experiment, cfg.limits.floors(teacher.metrics), cfg.limits.ceilings(teacher.metrics)
            ),
            max_concurrent_trials=concurrency(cfg, ray.cluster_resources(), shares),
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            reuse_actors=cfg.workers_per_trial == 1,  # a trial's process (torch imported, kernels warm) serves the next
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_root,
            callbacks=callbacks,
            stop=stop,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def trial_count(cfg: TuneConfig, space: dict[str, Any] | None = None) -> int:
    """Trials Tune may start: ``--num-samples``, or with ``--search grid`` that many repeats
    of the grid (configs over budget are skipped, so there may be fewer)."""
    space = space if space is not None else load_space(cfg.space)
    if resolve_search(cfg.search, space) != "grid":
        return cfg.num_samples
    return len(SpaceSampler(space, cfg.seed).points or [None]) * cfg.num_samples


def _searcher(cfg: TuneConfig, space: dict[str, Any], costs: CostModel) -> CostAwareSearch:
    """Effray's cost-aware searcher over the space: its own random/grid draws, or Optuna's."""
    budget, fit = Budget(cfg.max_size_kb, cfg.max_macs, cfg.max_latency_ms), cfg.prune_to_latency
    check_feasible(space, costs, budget, cfg.seed, fit_latency=fit)
    if cfg.search != "optuna":
        repeats = cfg.num_samples if cfg.search == "grid" else 1
        return CostAwareSearch(costs, budget, sampler=SpaceSampler(space, cfg.seed, repeats=repeats), fit_latency=fit)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise EffrayError("--search optuna needs Optuna: pip install 'effray[optuna]' (or optuna)") from None
    domain = to_param_space(space)
    if cfg.multi_objective:
        inner = OptunaSearch(domain, metric=["accuracy", "bytes"], mode=["max", "min"], seed=cfg.seed)
    else:
        inner = OptunaSearch(domain, metric=METRIC, mode="max", seed=cfg.seed)
    constants = {k: v for k, v in space.items() if not isinstance(v, dict)}
    return CostAwareSearch(costs, budget, inner=inner, constants=constants, fit_latency=fit)


def _scheduler(
    cfg: TuneConfig, path: str, floors: dict[str, float] | None = None, ceilings: dict[str, float] | None = None
) -> Any:
    """Early stopping: effray's multi-objective rungs (which also stop a trial that can no
    longer reach one of ``floors``, --max-drop's accuracy and --max-worst-class-drop's
    recall, or get below one of ``ceilings``, --max-ece's, each reported every epoch as
    ``val_<score>``), Ray's ASHA on accuracy, or none."""
    from ray import tune

    if cfg.scheduler == "pareto":
        return ParetoASHA(
            metric=METRIC,
            costs=(SCHEDULER_COSTS[cfg.objective],),
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            acc_margin=cfg.acc_margin,
            log_path=os.path.join(path, STOPPED_FILE) if "://" not in path else None,
            floors={f"val_{score}": bound for score, bound in (floors or {}).items()},
            ceilings={f"val_{score}": bound for score, bound in (ceilings or {}).items()},
        )
    if cfg.scheduler == "asha":
        return LastEpochSafeASHA(
            metric=METRIC,
            mode="max",
            time_attr="epoch",
            grace_period=cfg.grace_period,
            max_t=10_000,
            reduction_factor=cfg.reduction_factor,
        )
    return tune.schedulers.FIFOScheduler()


def _results(
    grid: Any, path: str, resumed: bool, workers: int, shares: bool, teacher: dict[str, Any]
) -> dict[str, Any]:
    """The search's one-line summary: trials measured, stopped early by the scheduler, errored."""
    finished = sum(1 for r in grid if r.error is None)
    measured = sum(1 for r in grid if r.error is None and (r.metrics or {}).get("final"))
    return {
        "experiment": path,
        "trials": len(grid),
        "finished": finished,
        "measured": measured,
        "stopped_early": finished - measured,
        "errored": len(grid) - finished,
        "resumed": resumed,
        "workers_per_trial": workers,
        "shared_data": shares,
        "teacher": teacher,
    }


def _summary_run(cfg: TuneConfig, mode: str, teacher: dict[str, Any]) -> dict[str, Any] | None:
    """The experiment's summary run: `effray report`'s table and Pareto plot (written to
    EXPERIMENT/report), in the trials' group. Never fails the search."""
    path = cfg.experiment
    if "://" in path:
        return None  # the report reads a local experiment directory
    settings = TrackerSettings(
        project=cfg.wandb_project,
        name=f"{cfg.name}-summary",
        run_id=stable_run_id(cfg.storage_root, f"{cfg.name}/summary"),
        mode=mode,
        dir=path,
        group=cfg.name,
        job_type="summary",
        config={"tune": to_dict(cfg), "teacher": {k: v for k, v in teacher.items() if not isinstance(v, (dict, list))}},
    )
    try:
        summary = report(ReportConfig(experiment=path), tracking=settings)
    except Exception as exc:  # noqa: BLE001 - no finished trial yet, a plotting or wandb problem: the search stands
        log.warning("no wandb summary run for %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    return {"run_id": settings.run_id, "report": summary["report"]}
