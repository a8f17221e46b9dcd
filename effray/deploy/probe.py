"""The search's deployed latency (:class:`effray.search.deployed.DeployProbe`), done the way
``effray export`` exports and :mod:`effray.deploy.latency` times: registered with the
search when :mod:`effray.deploy` is imported.

On the driver, :func:`prepare_probe` resolves ``--deploy auto`` (int8 only where the
target's CPU has VNNI/AMX, without which the int8 kernels sum pairs in int16 and are no
faster than fp32, and there only when the teacher's own int8 file is faster than its fp32
one at batch 1 on every target: :func:`auto_choice`), finds a node for every
``--latency-on`` resource (one line when none offers it) and starts a
:class:`~effray.deploy.latency.LatencyActor` there, then exports the teacher in its best
fp32 form for that runtime (BN folded; the runtime's own graph optimisations when it
loads it) and times it. In each trial, :meth:`ExportedProbe.measure` exports the artifact
as ``effray export`` does, parity check included, and times the file beside the
teacher's on every target, so every speed-up is runtime against runtime, taken
in one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effray.config import require, validated
from effray.deploy.config import ExportConfig
from effray.deploy.export import export
from effray.deploy.latency import ExportedFile, Measured, Timing, read_export, start_actor, time_exports, where
from effray.deploy.runtimes import RUNTIME_OF
from effray.errors import EffrayError
from effray.search.deployed import PROBES, DeployProbe, DeploySpec

# --deploy kind -> (effray export --format, --int8, the file that is timed)
PLANS = {
    "onnx": ("onnx", False, "onnx"),
    "onnx-int8": ("onnx", True, "onnx-int8"),
    "pt2": ("torch", False, "torch"),
    "pt2-int8": ("torch", True, "torch-int8"),
    "openvino": ("openvino", False, "openvino"),
    "openvino-int8": ("openvino", True, "openvino-int8"),
}


def resolve_kind(kind: str, int8_native: bool) -> tuple[str, str]:
    """``(kind, why)``: ``auto`` becomes the fastest deployable form for the target CPU."""
    if kind != "auto":
        why = "" if int8_native or not kind.endswith("int8") else "int8 asked for on a CPU without VNNI/AMX"
        return kind, why
    if int8_native:
        return "onnx-int8", "auto: ONNX Runtime int8 (the target CPU has VNNI/AMX)"
    return "onnx", "auto: ONNX Runtime fp32 (no VNNI/AMX on the target CPU: its int8 kernels sum pairs in int16)"


def auto_choice(by_target: dict[str, Measured] | None, failure: str = "") -> tuple[str, str]:
    """``--deploy auto`` on VNNI/AMX CPUs: ``(kind, why)`` from the teacher's fp32 and int8
    ONNX files timed together on every target (``timings`` = fp32, int8). int8 only where
    it is faster at batch 1 on every target: on a small net the int8 graph's own costs
    (quantizing the image, a thin stem conv, int8 pooling) can outweigh its faster GEMMs.
    ``by_target`` None: the teacher's int8 file could not be written (``failure``, the
    export's line, cut before its figures), so nothing says int8 would hold up here."""
    if by_target is None:
        return (
            "onnx",
            f"auto: ONNX Runtime fp32 (the teacher's int8 file was not written: {failure.split(' with ')[0]})",
        )
    ratios = {t: speedups(m.timings[0], m.timings[1]) for t, m in by_target.items()}
    said = "; ".join(
        f"{b1:.2f}x at batch 1, {bn:.2f}x at batch N" + (f" on {t}" if len(ratios) > 1 else "")
        for t, (b1, bn) in ratios.items()
    )
    if all(b1 > 1.0 for b1, _ in ratios.values()):
        return "onnx-int8", f"auto: ONNX Runtime int8 (VNNI/AMX; the teacher's int8 file ran {said} its fp32 speed)"
    return "onnx", f"auto: ONNX Runtime fp32 (the teacher's int8 file ran {said} its fp32 speed, VNNI/AMX and all)"


def speedups(base: Timing, other: Timing) -> tuple[float, float]:
    """``other``'s speed-up over ``base`` at batch 1 and at batch N."""
    return base.latency_ms_b1 / other.latency_ms_b1, other.img_s_bN / base.img_s_bN


def check_runtime(kind: str) -> None:
    """One line when the runtime of ``kind`` is not installed here."""
    if RUNTIME_OF[PLANS[kind][2]] == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise EffrayError(f"--deploy {kind} needs OpenVINO: pip install openvino") from None


@dataclass
class ExportedProbe(DeployProbe):
    """Ready on the driver; travels to every trial (the actors' handles with it)."""

    spec: DeploySpec
    kind: str  # resolved
    why: str  # why this kind (auto's choice, or int8 without native kernels); '' = as asked
    reduce_range: bool  # int8 kept within what a CPU without VNNI sums exactly (some target lacks it)
    teacher_file: ExportedFile
    actors: dict[str, Any] = field(default_factory=dict)  # target -> LatencyActor handle; {} = in-process
    teacher: dict[str, Any] = field(default_factory=dict)

    def timed(self, files: list[ExportedFile]) -> dict[str, Measured]:
        """``files`` timed together on every target (the targets at once: they are other nodes)."""
        s = self.spec
        if not self.actors:
            return {s.names[0]: time_exports(files, s.threads, s.batch, s.repeats)}
        import ray

        refs = {t: a.time.remote(files, s.threads, s.batch, s.repeats) for t, a in self.actors.items()}
        return {t: ray.get(r) for t, r in refs.items()}

    def measure(self, artifact_dir: str, data: str) -> dict[str, Any]:
        fmt, int8, kind = PLANS[self.kind]
        out = Path(artifact_dir) / "export"
        started = time.perf_counter()
        base = {"deploy": self.kind, "runtime": RUNTIME_OF[kind]}
        try:
            summary = export(
                validated(
                    ExportConfig(
                        artifact=str(artifact_dir),
                        format=fmt,
                        int8=int8,
                        data=data,
                        out=str(out),
                        int8_reduce_range="on" if self.reduce_range else "off",
                    )
                )
            )
        except EffrayError as exc:  # not deployable on this runtime: the row says why, the search goes on
            return {**base, "deploy_error": str(exc)}
        except (ValueError, RuntimeError) as exc:  # e.g. a diverged fine-tune's NaN quantizer grids: likewise
            return {**base, "deploy_error": f"not exportable: {type(exc).__name__}: {exc}"}
        exported = time.perf_counter() - started
        fields = row_fields(self.timed([self.teacher_file, read_export(out, kind)]), self.spec)
        return {
            **base,
            **fields,
            "deploy_agreement": summary["parity"][kind]["agreement"],
            "deploy_export_s": exported,
        }

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        self.actors = {}


def row_fields(by_target: dict[str, Measured], spec: DeploySpec) -> dict[str, Any]:
    """A trial's latency fields from runs that timed (teacher, student): the first target's
    unsuffixed, and with ``--latency-on`` every target's as ``<field>@<target>``."""
    out: dict[str, Any] = {}
    for i, (target, m) in enumerate(by_target.items()):
        teacher, student = m.timings
        b1, bn = speedups(teacher, student)
        f = {
            "latency_ms_b1": student.latency_ms_b1,
            "img_s_bN": student.img_s_bN,
            "speedup_b1": b1,
            "speedup_bN": bn,
            "teacher_latency_ms_b1": teacher.latency_ms_b1,
            "teacher_img_s_bN": teacher.img_s_bN,
            "latency_node": m.node,
        }
        f["slower_than_teacher"] = f["speedup_b1"] < 1.0 or f["speedup_bN"] < 1.0
        if i == 0:
            out.update(f, latency_cpu=m.cpu, latency_threads=m.threads, batch_N=m.batch)
        if spec.targets:
            out.update({f"{k}@{target}": v for k, v in f.items()})
    return out


def teacher_fields(by_target: dict[str, Measured], spec: DeploySpec, kind: str) -> dict[str, Any]:
    """The teacher's latency on the runtime, for ``teacher.json`` and the MAC-scaled estimate."""
    first = next(iter(by_target.values()))
    out: dict[str, Any] = {
        "deploy_kind": kind,
        "runtime": first.timings[0].runtime,
        "deployed_latency_ms_b1": first.timings[0].latency_ms_b1,
        "deployed_img_s_bN": first.timings[0].img_s_bN,
        "batch_N": first.batch,
        "latency_threads": first.threads,
        "latency_cpu": first.cpu,
        "latency_node": first.node,
    }
    if spec.targets:
        for target, m in by_target.items():
            out.update(
                {
                    f"deployed_latency_ms_b1@{target}": m.timings[0].latency_ms_b1,
                    f"deployed_img_s_bN@{target}": m.timings[0].img_s_bN,
                    f"latency_cpu@{target}": m.cpu,
                    f"latency_node@{target}": m.node,
                }
            )
    return out


def export_teacher(teacher: str, fmt: str, data: str, out: Path, int8: bool) -> str:
    """The teacher's ``fmt`` files in ``out``, with its int8 ONNX file beside them when
    ``int8``, in one export; returns why the int8 file is not there ('' when it is, or was
    not asked for): one that can't be written or fails its parity check is left out and the
    fp32 files kept (``--int8-fallback``)."""
    cfg = ExportConfig(artifact=teacher, format=fmt, int8=int8, int8_fallback=True, data=data, out=str(out))
    summary = export(validated(cfg))
    return summary["int8"].get("failed", {}).get("onnx-int8", "") if int8 else ""


@PROBES.register("exported")
def prepare_probe(spec: DeploySpec, teacher: str, data: str, out_dir: str) -> ExportedProbe:
    """The probe for ``spec``: targets found and their actors started, the kind resolved,
    the teacher exported to ``out_dir`` and timed on every target. Every bad value fails
    here, in one line, before any trial."""
    require(spec.kind == "auto" or spec.kind in PLANS, f"--deploy {spec.kind!r}: one of auto, {', '.join(PLANS)}, off")
    actors: dict[str, Any] = {}
    ready = False
    try:
        import ray

        for t in spec.targets:  # a target no node offers fails here, the ones started before it let go below
            actors[t] = start_actor(t)
        places = ray.get([a.where.remote() for a in actors.values()]) if actors else [where()]
        int8_native = all(p["vnni"] for p in places)
        kind, why = resolve_kind(spec.kind, int8_native)
        check_runtime(kind)
        fmt, _, file_kind = PLANS[kind]
        teacher_kind = file_kind.removesuffix("-int8")
        out = Path(out_dir)
        measure_int8 = spec.kind == "auto" and kind == "onnx-int8"  # auto's int8 is measured, not assumed
        int8_error = export_teacher(teacher, fmt, data, out, measure_int8)
        teacher_file = read_export(out, teacher_kind)
        probe = ExportedProbe(spec, kind, why, not int8_native, teacher_file, actors)
        timed = None
        if measure_int8 and not int8_error:
            timed = probe.timed([teacher_file, read_export(out, "onnx-int8")])
        if measure_int8:
            probe.kind, probe.why = kind, why = auto_choice(timed, int8_error)
        timed = timed or probe.timed([teacher_file])
        probe.teacher = {
            **teacher_fields(timed, spec, teacher_kind),
            "deploy": kind,
            "deploy_why": why,
            "int8_native": int8_native,
            **({"deploy_int8_error": int8_error} if int8_error else {}),
        }
        ready = True
        return probe
    finally:
        if not ready:  # failed before it was ready: the actors go with it
            import ray

            for a in actors.values():
                ray.kill(a)
