"""What the search asks of deployment: each measured trial exported, checked and timed on the
runtime it will run on, against the teacher on that same runtime.

Exporting and timing are the deploy layer's (:mod:`effray.deploy.latency`), which comes
after the search, so the search holds only this interface and a registry the deploy layer
fills when it is imported (as :mod:`effray.compress` registers its checkpoint formats with
:mod:`effray.train.checkpoint`): the ``effray`` CLI and ``effray run`` import it; a Python
caller imports :mod:`effray.deploy` first. On the driver, :func:`deploy_probe` turns the
search's flags into a :class:`DeployProbe`, checked before any trial (an unknown runtime, a
resource no node has: one line) with the teacher already measured; the probe travels to
every trial in its context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effray.config import require
from effray.registry import Registry

# --deploy: what each measured trial is exported to (effray export's kinds, .pt2 named as the file is)
DEPLOY_KINDS = ("onnx", "onnx-int8", "pt2", "pt2-int8", "openvino", "openvino-int8")
DEPLOY_CHOICES = ("auto", *DEPLOY_KINDS, "off")
LOCAL = "local"  # the target name of a measurement in the trial's own process


@dataclass(frozen=True)
class DeploySpec:
    """The search's deployment flags, as the deploy layer takes them."""

    kind: str  # one of DEPLOY_KINDS, or auto (the fastest here)
    targets: tuple[str, ...]  # custom Ray resources to time on (one front each); () = in the trial's process
    threads: int  # runtime threads, fixed, for teacher and student alike
    batch: int  # the throughput batch (N of img_s_bN)
    repeats: int  # timed batch-1 calls per model (the batch-N ones: a sixth, at least 3)

    @property
    def names(self) -> tuple[str, ...]:
        """The targets' names in the rows' ``<field>@<target>`` columns."""
        return self.targets or (LOCAL,)


def parse_targets(text: str) -> tuple[str, ...]:
    """``--latency-on a,b`` -> ``("a", "b")``; one line for an empty or repeated name."""
    names = tuple(t.strip() for t in text.split(",")) if text.strip() else ()
    require(all(names), f"--latency-on {text!r} has an empty resource name; pass names like inference,edge")
    require(len(set(names)) == len(names), f"--latency-on {text!r} names a resource twice")
    return names


class DeployProbe(ABC):
    """The deployment a search measures, ready on the driver: the runtime resolved, the
    targets found, the teacher exported and timed. Pickled into every trial's context."""

    spec: DeploySpec
    teacher: dict[str, Any]  # the teacher's fields for teacher.json (runtime, latency_ms_b1, img_s_bN, ...)

    @abstractmethod
    def measure(self, artifact_dir: str, data: str, parity: bool = True) -> dict[str, Any]:
        """Export the artifact in ``artifact_dir`` (to ``artifact_dir/export``), check it
        against the artifact on ``data``'s val split, and time it beside the teacher on every
        target: a trial's row fields (``runtime``, ``latency_ms_b1``, ``img_s_bN``,
        ``speedup_b1``, ``speedup_bN``, ..., one ``<field>@<target>`` set per target), or
        ``deploy_error`` when the file fails its check."""

    @abstractmethod
    def close(self) -> None:
        """Let the measuring actors go (the driver calls it when the search ends)."""


# "exported": (spec, teacher checkpoint, prepared dataset, a directory for the teacher's files) -> probe
PROBES: Registry[Callable[[DeploySpec, str, str, str], DeployProbe]] = Registry("deploy measurement")


def deploy_probe(spec: DeploySpec, teacher: str, data: str, out_dir: str) -> DeployProbe:
    """The registered probe for ``spec``, ready (teacher measured); one line when the deploy
    layer was never imported in this process."""
    require(
        "exported" in PROBES,
        "--deploy needs effray's deploy layer: import effray.deploy before calling the search (the effray CLI does), "
        "or pass --deploy off",
    )
    return PROBES.get("exported")(spec, teacher, data, out_dir)
