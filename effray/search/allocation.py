"""The search's sensitivity stage: before the first trial of a space with
``allocation: sensitivity``, the teacher's layers are probed (``effray sensitivity``, one
Ray task per layer) at the space's own bit widths and prune rates (unstructured, and
structured when the space cuts channels), and the table's path joins the space as a
constant. Each trial's allocation is then made on the driver as it is suggested
(:meth:`effray.search.searcher.CostModel.allocate`), against the bytes (the MACs, for
channels) of the uniform config it was drawn as."""

from __future__ import annotations

from typing import Any

from effray.compress.config import OFF
from effray.compress.sensitivity import SensitivityConfig
from effray.compress.sensitivity_run import sensitivity
from effray.config import require
from effray.search.config import TuneConfig

# beside the space's own: settings both cheaper and dearer than a uniform config's, finely
# enough spaced that a layer can step down or up by less than half its bytes
PROBE_BITS, PROBE_RATES = (2, 3, 4, 6, 8), (0.25, 0.5, 0.75)


def entry_values(spec: Any) -> list[Any]:
    """The values a space entry can take, a range as its two ends and its middle."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(args)
    return [args[0], (args[0] + args[1]) / 2, args[1]]


def needs_probes(space: dict[str, Any]) -> bool:
    """Whether the space allocates by sensitivity without naming a table to allocate from."""
    return "sensitivity" in entry_values(space.get("allocation", "uniform")) and not space.get("sensitivity")


def probe_settings(space: dict[str, Any]) -> tuple[str, str]:
    """(bits, rates) to probe, as ``effray sensitivity`` takes them: the space's k-bit widths
    and prune rates with :data:`PROBE_BITS` and :data:`PROBE_RATES`, so a layer has settings
    both cheaper and dearer than the uniform config's to trade."""
    bits = {int(b) for b in entry_values(space.get("bits", OFF)) if int(b) != OFF} | set(PROBE_BITS)
    rates = {round(float(r), 4) for r in entry_values(space.get("prune_rate", 0.0)) if 0 < float(r) < 1}
    rates |= set(PROBE_RATES)
    return ",".join(map(str, sorted(bits))), ",".join(f"{r:g}" for r in sorted(rates))


def probe_kinds(space: dict[str, Any]) -> str:
    """The pruning kinds the space draws: structured ones allocate channels from structured probes."""
    kinds = {str(k) for k in entry_values(space.get("prune_kind", "unstructured"))}
    return ",".join(k for k in ("unstructured", "structured") if k in kinds) or "unstructured"


def with_sensitivity(cfg: TuneConfig, space: dict[str, Any]) -> dict[str, Any]:
    """``space`` with the sensitivity table its allocation needs: probed now into the
    experiment's ``sensitivity/`` (a rerun reuses the probes that finished)."""
    if not needs_probes(space):
        return space
    require(
        "://" not in cfg.experiment,
        "allocation: sensitivity with --storage on cloud storage: run `effray sensitivity` first and give its "
        "sensitivity.parquet as the space's `sensitivity:` entry",
    )
    bits, rates = probe_settings(space)
    done = sensitivity(
        SensitivityConfig(
            teacher=cfg.teacher,
            data=cfg.data,
            out=f"{cfg.experiment}/sensitivity",
            bits=bits,
            rates=rates,
            kinds=probe_kinds(space),
            batch_size=cfg.eval_batch_size,
            cpus_per_task=cfg.cpus_per_worker,
            gpus_per_task=cfg.gpus_per_worker,
            trust_code=cfg.trust_code,
        )
    )
    return {**space, "sensitivity": done["parquet"]}
