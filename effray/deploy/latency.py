"""How fast exported files run on their runtime: batch-1 latency and batch-N throughput,
models timed side by side, in this process or on a Ray actor pinned to a node type.

Timing is the runtime's call alone, on normalised float32 NCHW input of the file's recorded
image shape (the input's normalisation is the same for every model, so it would only dilute
a ratio): a fixed thread count, warm-up calls, then the median of repeated calls. Several
files are timed interleaved (a, b, a, b, ...), as :func:`effray.compress.measure.latency_ms`
times modules, so load from other processes on a shared machine hits them alike and their
ratio stays fair: a student is always timed in the same run as its teacher.

A file travels as its bytes (:class:`ExportedFile`), not as a path: the node that times it
(``--latency-on``, e.g. the CPU inference node of a cluster whose trials train on GPUs)
need not see the storage it was written to.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.compress.program import vnni
from effray.config import require
from effray.deploy.model import EXPORT_FILES, load_program, read_sidecar
from effray.deploy.runtimes import RUNTIME_OF, openvino_model, ort_session
from effray.errors import EffrayError
from effray.hardware import cpu_summary

Runner = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class ExportedFile:
    """One export file (OpenVINO's: the ``.xml`` and its ``.bin``) as bytes, with what
    opening it needs."""

    kind: str  # an export kind (effray.deploy.model.EXPORT_FILES)
    files: dict[str, bytes]  # file name -> contents; EXPORT_FILES[kind] among them
    image_shape: tuple[int, int, int]  # HWC, as the export recorded it
    full_range: bool  # a full-range int8 program (see effray.deploy.model.load_program)

    @property
    def runtime(self) -> str:
        return RUNTIME_OF[self.kind]


def read_export(export_dir: str | Path, kind: str) -> ExportedFile:
    """The ``kind`` file of an ``effray export`` directory, read into memory."""
    d = Path(export_dir)
    sidecar = read_sidecar(d)
    name = (sidecar.get("files") or {}).get(kind)
    require(bool(name) and (d / name).is_file(), f"{d} holds no {kind} file; export it with that --format")
    names = [name, *([Path(name).with_suffix(".bin").name] if kind.startswith("openvino") else [])]
    return ExportedFile(
        kind=kind,
        files={n: (d / n).read_bytes() for n in names},
        image_shape=tuple(int(v) for v in sidecar["image_shape"]),
        full_range=not (sidecar.get("int8") or {}).get("reduce_range", True),
    )


def open_runner(f: ExportedFile, directory: Path, threads: int) -> Runner:
    """``f`` written into ``directory`` and opened in its runtime at ``threads`` threads
    (torch's count is the caller's to set)."""
    for name, data in f.files.items():
        (directory / name).write_bytes(data)
    path = directory / EXPORT_FILES[f.kind]
    if f.runtime == "onnxruntime":
        session = ort_session(path, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    if f.runtime == "openvino":
        request = openvino_model(path, threads).create_infer_request()
        return lambda x: request.infer({0: x})
    import torch

    module = load_program(path, f.kind, "cpu", list(f.image_shape), f.full_range)

    def forward(x: np.ndarray) -> Any:
        with torch.no_grad():
            return module(torch.from_numpy(x))

    return forward


@dataclass(frozen=True)
class Timing:
    """One file's figures from one run."""

    kind: str
    runtime: str
    latency_ms_b1: float  # median ms of a batch-1 call
    img_s_bN: float  # images per second at batch N (median call)


@dataclass(frozen=True)
class Measured:
    """A run of :func:`time_exports`: each file's figures and where they were taken."""

    timings: tuple[Timing, ...]
    node: str  # the Ray node id ('' outside Ray)
    cpu: str  # effray.hardware.cpu_summary() of that node
    vnni: bool
    threads: int
    batch: int  # N


def where() -> dict[str, Any]:
    """This process's node id, CPU summary and whether its int8 kernels have VNNI."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"node": node, "cpu": cpu_summary(), "vnni": vnni()}


def time_exports(
    files: Sequence[ExportedFile], threads: int = 1, batch: int = 256, repeats: int = 30, warmup: int = 3
) -> Measured:
    """Each file's median batch-1 latency and batch-``batch`` throughput at ``threads``
    threads, the files timed interleaved (``repeats`` batch-1 rounds, a sixth as many
    batch-N rounds, at least 3), on seeded normal inputs of the files' image shape."""
    import torch

    require(bool(files) and threads >= 1 and batch >= 1 and repeats >= 1, "time_exports needs files and counts >= 1")
    h, w, c = files[0].image_shape
    x = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="effray-latency-") as tmp:
            runners = []
            for i, f in enumerate(files):
                (Path(tmp) / str(i)).mkdir()
                runners.append(open_runner(f, Path(tmp) / str(i), threads))
            ms_b1 = _interleaved(runners, np.ascontiguousarray(x[:1]), repeats, warmup)
            ms_bn = _interleaved(runners, x, max(3, repeats // 6), warmup)
    finally:
        torch.set_num_threads(previous)
    timings = tuple(
        Timing(f.kind, f.runtime, b1, batch / (bn / 1000.0)) for f, b1, bn in zip(files, ms_b1, ms_bn, strict=True)
    )
    here = where()
    return Measured(timings, here["node"], here["cpu"], here["vnni"], threads, batch)


def _interleaved(runners: list[Runner], x: np.ndarray, repeats: int, warmup: int) -> list[float]:
    """Median ms per call of each runner on ``x``, in rounds of one call each."""
    for run in runners:
        for _ in range(warmup):
            run(x)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            t = time.perf_counter()
            run(x)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1000.0 for t in times]


class LatencyActor:
    """Times files on the node it was placed on (``--latency-on``), one run at a time
    (``max_concurrency=1``), so two trials' measurements never share its CPUs."""

    def where(self) -> dict[str, Any]:
        return where()

    def time(self, files: Sequence[ExportedFile], threads: int, batch: int, repeats: int) -> Measured:
        return time_exports(files, threads, batch, repeats)


def resource_amounts(resource: str) -> list[float]:
    """How much of ``resource`` each alive node offers (those that offer it)."""
    import ray

    return [float(n["Resources"][resource]) for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource)]


def start_actor(resource: str) -> Any:
    """A :class:`LatencyActor` on a node offering ``resource``: it takes no CPU from the
    node's trials, only (up to one unit of) the label; one line when no node offers it."""
    import ray

    amounts = resource_amounts(resource)
    if not amounts:
        offered = sorted(
            {k for n in ray.nodes() if n.get("Alive") for k in n["Resources"] if not k.startswith(("node:", "memory"))}
        )
        raise EffrayError(
            f"--latency-on {resource}: no node of this cluster offers resource {resource!r} (they offer "
            f"{', '.join(offered)}); start a node with it (ray start --resources '{{\"{resource}\": 1}}') or drop it"
        )
    return (
        ray.remote(LatencyActor)
        .options(num_cpus=0, resources={resource: min(1.0, max(amounts))}, max_concurrency=1)
        .remote()
    )
