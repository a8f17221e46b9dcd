"""Deployment benchmark: one trained model, every way effray can run it on this CPU.

Prepares ``--images`` rows of the shared CIFAR-10 file (or takes ``--data``), trains a
``--model`` teacher in this process (:func:`effray.train.local.fit_arrays`, or takes
``--teacher``), writes every export with ``effray export --format all --int8`` (its parity
figures and write/load seconds are printed), then times each path on the same real
held-out images at the same ``--threads``:

* ``fp32 eager``: the checkpoint's model as trained (BN unfolded, NCHW);
* ``fp32 best``: the fastest of BN folded, + channels-last, + ``torch.compile`` (inductor;
  its compile seconds printed apart), + bf16 autocast where this CPU computes bf16 natively;
* ``torchao int8 (eager)``: PT2E int8 lowered to oneDNN kernels, run eagerly
  (:func:`effray.compress.int8.to_int8`, what ``effray compress`` measures);
* ``torchao int8 (torch.compile)``: the same q/dq program compiled by inductor with
  freezing (same kernels, the float ops between them fused; compile seconds printed apart);
* ``torchao int8 (.pt2)``: the exported ``model.int8.pt2`` as ``load_deployable`` runs it;
* ``onnxruntime fp32`` / ``int8``: ``model.onnx`` and the QDQ ``model.int8.onnx``.

Latency at batch 1 (median ms) and throughput at batch 256 (img/s), top-1 on the held-out
split's whole batches of 256, ratios against ``fp32 best``; one-off costs (compile,
lowering, each export file's write and load) in their own table. Last, ``effray serve``
under load, batching off and on (:func:`serve_load.measure_serve`, serving the exported
``model.pt2``; skipped with a note when that module is missing).

    .venv/bin/python bench/deploy.py [--model convnet --width 0.5 --images 5000 --teacher-epochs 4 --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PARQUET = ROOT.parent / "shared" / "data" / "cifar10-train.parquet"


def timed(fn: Callable[[Any], Any], x: Any, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn(x)``."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prepare(out: Path, images: int) -> Path:
    from effray.cluster import init_ray
    from effray.data.prepare import PrepareConfig, prepare

    data = out / "data"
    if not (data / "meta.json").is_file():
        init_ray(log_to_driver=False)
        prepare(PrepareConfig(source=str(PARQUET), out=str(data), limit=images, val_fraction=0.2))
    return data


def train(data: Path, out: Path, model: str, width: float, epochs: int) -> Path:
    from effray.data.arrays import load_arrays
    from effray.data.prepare import load_meta
    from effray.train.checkpoint import save_payload
    from effray.train.local import fit_arrays, fitted_payload

    path = out / f"teacher-{model}-{width}-e{epochs}"
    if not (path / "model.pt").is_file():
        meta = load_meta(data)
        t = time.perf_counter()
        net = fit_arrays(load_arrays(data, "train"), meta, epochs=epochs, model=model, width=width)
        print(f"teacher: {model} x{width}, {epochs} epochs in {time.perf_counter() - t:.0f} s", flush=True)
        save_payload(path, fitted_payload(net, meta, epochs, config={"data": {"data": str(data)}}))
    return path


def best_fp32(
    model: torch.nn.Module, x1: torch.Tensor, x256: torch.Tensor, bf16: bool
) -> tuple[str, Callable, dict[str, float]]:
    """The fastest fp32 path at batch 256 among folded / channels-last / compiled (and bf16
    where native), with torch.compile's seconds."""
    from effray.compress.program import quiet
    from effray.compress.quantize import fold_bn

    folded = fold_bn(copy.deepcopy(model)).eval()
    last = copy.deepcopy(folded).to(memory_format=torch.channels_last)

    def cl(m: torch.nn.Module) -> Callable:
        return lambda x: m(x.contiguous(memory_format=torch.channels_last))

    candidates: dict[str, Callable] = {"BN folded": folded, "BN folded, channels-last": cl(last)}
    t = time.perf_counter()
    with quiet():
        compiled = torch.compile(last)
        cl(compiled)(x1), cl(compiled)(x256)
    seconds = {"fp32 torch.compile (2 shapes)": time.perf_counter() - t}
    candidates["BN folded, channels-last, torch.compile"] = cl(compiled)
    if bf16:

        def autocast(fn: Callable) -> Callable:
            return lambda x: _bf16(fn, x)

        candidates["... + bf16 autocast"] = autocast(cl(compiled))
    speed = {name: timed(fn, x256, 3) for name, fn in candidates.items()}
    name = min(speed, key=speed.get)
    return name, candidates[name], seconds


def _bf16(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(x).float()


def ort_session(path: Path, threads: int) -> Callable:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="", help="a prepared dataset (default: --images rows of the shared CIFAR-10 file)")
    p.add_argument("--teacher", default="", help="a checkpoint trained on --data (default: trained here)")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--model", default="convnet", help="the demo preset's teacher by default")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime threads (1: on a shared machine 2 threads time OpenMP barriers, not kernels)",
    )
    p.add_argument("--repeats", type=int, default=30, help="timed batch-1 calls per path (batch 256: a fifth)")
    p.add_argument("--min-int8-agreement", type=float, default=0.97, help="export's parity bar for the int8 files")
    p.add_argument("--requests", type=int, default=300, help="Serve requests per run (0 = skip the Serve rows)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-deploy")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    from effray.compress.int8 import int8_ops, quantize_int8, to_int8
    from effray.compress.program import quiet
    from effray.data.arrays import prepared_batches
    from effray.deploy.config import ExportConfig
    from effray.deploy.export import export
    from effray.deploy.model import EXPORT_FILES, load_deployable, load_program, normalise
    from effray.hardware import bf16_native
    from effray.train.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    bf16 = bf16_native(torch.device("cpu"))
    cpu = (
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, bf16 native {'yes' if bf16 else 'no'}, "
        f"{os.cpu_count()} cores, {args.threads} threads"
    )
    print(f"# deploy paths; {cpu}", flush=True)
    data = Path(args.data) if args.data else prepare(args.out, args.images)
    teacher = Path(args.teacher) if args.teacher else train(data, args.out, args.model, args.width, args.teacher_epochs)

    exported = args.out / "export"
    # int8 PTQ of the demo teacher agrees with fp32 on ~99 % of held-out images (even as a
    # q/dq reference), under export's 99.5 % default: the bench records the figure instead
    summary = export(
        ExportConfig(
            artifact=str(teacher),
            format="all",
            int8=True,
            out=str(exported),
            data=str(data),
            min_int8_agreement=args.min_int8_agreement,
        )
    )
    print("export:", json.dumps({k: summary[k] for k in ("parity", "seconds")}), flush=True)
    model, _ = load_checkpoint(teacher)
    info = load_deployable(teacher, device="cpu").info
    held_out = list(prepared_batches(data, "val", 256)[1])
    images, labels = np.concatenate([x for x, _ in held_out]), np.concatenate([y for _, y in held_out])
    x_all = torch.from_numpy(normalise(images, info.mean, info.std))
    x256, x1 = x_all[:256].contiguous(), x_all[:1].contiguous()
    calib = [
        (torch.from_numpy(normalise(x, info.mean, info.std)), y) for x, y in prepared_batches(data, "train", 256)[1]
    ][:8]

    t = time.perf_counter()
    int8 = to_int8(model, calib)
    seconds = {"torchao int8: export + calibrate + lower (to_int8)": time.perf_counter() - t}
    assert int8_ops(int8), "the int8 module runs no oneDNN int8 kernel"
    best_name, best, compile_s = best_fp32(model, x1, x256, bf16)
    seconds.update(compile_s)
    seconds.update({f"effray export: {k}": v for k, v in summary["seconds"].items()})
    t = time.perf_counter()
    with quiet(), torch._inductor.config.patch(freezing=True):  # inductor prepacks int8 weights only when freezing
        compiled_int8 = torch.compile(quantize_int8(model, calib))
        compiled_int8(x1), compiled_int8(x256)
    seconds["torchao int8: torch.compile, freezing (2 shapes)"] = time.perf_counter() - t
    paths: dict[str, Callable] = {
        "fp32 eager": model,
        f"fp32 best ({best_name})": best,
        "torchao int8 (PT2E, oneDNN, eager)": int8,
        "torchao int8 (PT2E, torch.compile)": compiled_int8,
        "torchao int8 (model.int8.pt2 loaded)": load_program(
            exported / EXPORT_FILES["torch-int8"], "torch-int8", image_shape=info.image_shape
        ),
        "onnxruntime fp32": ort_session(exported / EXPORT_FILES["onnx"], args.threads),
        "onnxruntime int8 (QDQ)": ort_session(exported / EXPORT_FILES["onnx-int8"], args.threads),
    }
    rows = []
    with torch.no_grad():
        for name, fn in paths.items():
            # whole batches of 256 only: a compiled path would recompile for the remainder
            logits = torch.cat([fn(x_all[i : i + 256]) for i in range(0, len(x_all) - 255, 256)])
            b1 = timed(fn, x1, args.repeats)
            b256 = timed(fn, x256, max(3, args.repeats // 5))
            rows.append(
                {
                    "path": name,
                    "b1_ms": b1 * 1000,
                    "b256_img_s": 256 / b256,
                    "accuracy": float((logits.argmax(1).numpy() == labels[: len(logits)]).mean()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    ref = rows[1]
    print(f"\n# top-1 on the first {len(labels) // 256 * 256} held-out images; {cpu}")
    print("| path | batch 1 (ms) | batch 256 (img/s) | top-1 | b1 speedup vs fp32 best | b256 speedup vs fp32 best |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['path']} | {r['b1_ms']:.2f} | {r['b256_img_s']:.0f} | {r['accuracy']:.4f} | "
            f"{ref['b1_ms'] / r['b1_ms']:.2f}x | {r['b256_img_s'] / ref['b256_img_s']:.2f}x |"
        )
    print("\n| one-off cost | seconds |\n| --- | --- |")
    for k, v in seconds.items():
        print(f"| {k} | {v:.1f} |")
    serve_rows(args, exported)


def serve_rows(args: argparse.Namespace, model_path: Path) -> None:
    """``effray serve`` requests/s and latency, batching off and on (bench/serve_load.py)."""
    if args.requests <= 0:
        return
    try:
        from serve_load import measure_serve
    except ModuleNotFoundError as exc:
        print(f"\n(Serve rows skipped: {exc.name} is not here; bench/serve_load.py provides measure_serve)")
        return
    print(
        f"\n# effray serve, {args.requests} requests from {args.clients} clients on 127.0.0.1 (clients share the cores)"
    )
    print("| batching | requests/s | p50 (ms) | p99 (ms) | errors |\n| --- | --- | --- | --- | --- |")
    for batching in (False, True):
        r = measure_serve(str(model_path), requests=args.requests, clients=args.clients, batching=batching)
        print(
            f"| {'on' if batching else 'off'} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r.get('errors', 0)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
