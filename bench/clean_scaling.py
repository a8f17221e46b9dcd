"""Rows/s of each `effray data clean` detector and how its cost grows with the data.

For each size N (the first N rows of the shared CIFAR-10 Parquet file, prepared as
effray's canonical dataset, train split only), in one local Ray session, timed apart:

1. exact-duplicate hashing: :func:`effray.clean.passes.hash_pass` (Ray Data read + decode +
   blake2b per image, collected on the driver);
2. embedding: :func:`effray.clean.passes.embed_pass` (Ray Data over an actor pool). With
   ``--embedder pixels`` (the default, as `effray data clean`'s): thumbnails and pixel
   descriptors, no model. With ``--embedder classifier``: also the classifier's 4 zoom
   views x 2 mirrors per image, from a checkpoint made once up front (a randomly
   initialised ``convnet`` by default: the cost of a forward does not depend on the
   weights; ``--train-epochs`` trains one instead, ``--checkpoint`` takes yours), so no
   training is inside the detector's time;
3. the blockwise kNN: :func:`effray.clean.knn.relative_knn`, the search `effray data clean`
   runs (each image against all; the pixel embedder's coarse shortlist of ``--shortlist``
   per image re-scored by the alignment search; best of ``--knn-repeat`` runs), with the
   per-task memory that ``--block-rows`` implies (block^2 + block*m similarities, and the
   alignment search's views of a few hundred queries) next to what one N x N matrix would
   take: compute grows as N^2 (the shortlist) + N (the re-scoring), memory per task stays
   bounded by the block;
4. with ``--labels``: the K-fold Tune trials (:func:`effray.clean.labels.run_folds`,
   ``--folds`` folds of ``--label-epochs`` epochs) + cleanlab (:func:`label_issues`).

Before timing, one untimed warm-up pass of 1-3 on the smallest size starts Ray's worker
processes. The embed time still holds each pass's actor start-up (the model is built per
pass, as in a real clean), which weighs most at small N. Printed: a markdown table with a
row per size, then each step's time growth between the largest and smallest size next to
the N and N^2 ratios (linear steps track N; the kNN tracks N^2).

    python bench/clean_scaling.py [--sizes 2500,5000,10000] [--data DIR] [--embedder pixels] [--labels]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from effray.clean import pixels
from effray.clean.config import CleanConfig
from effray.clean.dataset import without_rows, write_dataset
from effray.clean.embed import PIXEL_GRID, finish
from effray.clean.knn import REFINE_ROWS, relative_knn
from effray.clean.passes import embed_gpus, embed_pass, hash_pass
from effray.clean.run import check_checkpoint
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.hardware import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def subsets(data: str, sizes: list[int], work: str) -> dict[int, str]:
    """A dataset directory per size: the first N train rows of ``data`` (``data`` itself for
    its full size). Rows interleave the classes, so every prefix is balanced."""
    meta = load_meta(data)
    total = meta["counts"]["train"]
    table = without_rows(data, "train", set())
    out = {}
    for n in sizes:
        if n >= total:
            out[n] = data
            continue
        d = os.path.join(work, f"n{n}")
        write_dataset(
            d,
            {"train": table.slice(0, n)},
            meta["classes"],
            meta["image_shape"],
            {"source": f"{meta['source']}[:{n}]", "source_checksum": f"{meta.get('source_checksum', '')}:{n}"},
        )
        out[n] = d
    return out


def make_checkpoint(args: argparse.Namespace, data: str, work: str) -> tuple[str, str]:
    """``(path, what it is)``: ``--checkpoint``, or a convnet saved once up front, random or
    trained ``--train-epochs`` on ``data`` (outside any timed step)."""
    if args.checkpoint:
        return args.checkpoint, f"--checkpoint {args.checkpoint}"
    from effray.data.arrays import load_arrays
    from effray.models import build_model
    from effray.train.checkpoint import save_payload
    from effray.train.local import fit_arrays, fitted_payload

    meta = load_meta(data)
    torch.manual_seed(0)
    if args.train_epochs > 0:
        train = load_arrays(data, "train")
        started = time.perf_counter()
        model = fit_arrays(train, meta, epochs=args.train_epochs, model=args.model, width=args.width, seed=0)
        what = (
            f"{args.model} x{args.width} trained {args.train_epochs} epoch(s) on {len(train['label'])} rows "
            f"({time.perf_counter() - started:.0f} s, not timed)"
        )
    else:
        model = build_model(args.model, int(meta["num_classes"]), int(meta["image_shape"][2]), args.width)
        what = f"{args.model} x{args.width}, randomly initialised (same forward cost as a trained one)"
    path = os.path.join(work, "checkpoint")
    save_payload(path, fitted_payload(model, meta, args.train_epochs))
    return path, what


def time_hash(data: str) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of one hashing pass over the train split, and its rows."""
    shape = tuple(load_meta(data)["image_shape"])
    started = time.perf_counter()
    rows = hash_pass([(data, "train", "train")], shape)
    return time.perf_counter() - started, rows


def time_embed(data: str, payload: dict[str, Any] | None, cfg: CleanConfig) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of one embedding pass (no calibration copies), and its rows."""
    meta = load_meta(data)
    shape = tuple(meta["image_shape"])
    no_copies = np.zeros((0, *shape), np.uint8)
    started = time.perf_counter()
    rows, _ = embed_pass([(data, "train", "train")], no_copies, payload, cfg, shape, embed_gpus(cfg))
    return time.perf_counter() - started, rows


def time_knn(emb: dict[str, np.ndarray], channels: int, cfg: CleanConfig, repeat: int = 1) -> tuple[list[float], int]:
    """Seconds of each of ``repeat`` searches of every row against all (the classifier's
    finished embeddings are made first, untimed), and the floats the keys hold."""
    ids = np.arange(len(emb["index"]))
    if cfg.embedder == "pixels":
        queries, keys = emb["coarse"], emb["coarse"][:, :1]
        extra = {"query_thumbs": emb["thumb"], "key_fine": emb["fine"]}
        floats = keys.size + emb["fine"].size + emb["thumb"].size / 4
    else:
        keys = finish(emb["views"], int(emb["views"].shape[2] - channels * PIXEL_GRID * PIXEL_GRID))
        queries, extra, floats = keys, {}, keys.size
    times = []
    for _ in range(max(1, repeat)):
        started = time.perf_counter()
        sims, where, _ = relative_knn(
            queries,
            keys,
            cfg.neighbours,
            query_ids=ids,
            key_ids=ids,
            shortlist=cfg.shortlist,
            block=cfg.block_rows,
            **extra,
        )
        times.append(time.perf_counter() - started)
    assert sims.shape == (len(ids), cfg.neighbours) and not (where == ids[:, None]).any()
    return times, int(floats)


def time_labels(data: str, args: argparse.Namespace, work: str) -> float:
    """Seconds of the K-fold Tune trials and cleanlab on the train split (loading excluded)."""
    from effray.clean.labels import label_issues, run_folds
    from effray.data.arrays import load_arrays

    meta = load_meta(data)
    train = load_arrays(data, "train")
    storage = tempfile.mkdtemp(prefix="folds-", dir=work)
    started = time.perf_counter()
    fits = run_folds(
        train,
        meta,
        list(range(args.folds)),
        k=args.folds,
        epochs=args.label_epochs,
        model=args.model,
        width=args.width,
        batch_size=128,
        seed=0,
        cpus=1.0,
        gpus=0.0,
        storage=storage,
    )
    label_issues(train["label"], fits["probs"])
    seconds = time.perf_counter() - started
    shutil.rmtree(storage, ignore_errors=True)
    return seconds


def task_floats(block: int, shortlist: int, embedder: str) -> int:
    """Floats one kNN task holds at once: the block's similarities and running shortlist,
    and (pixels) the alignment search's views and candidates for :data:`REFINE_ROWS` queries."""
    fine = 3 * pixels.FINE**2
    refine = REFINE_ROWS * (pixels.VIEWS + shortlist) * fine if embedder == "pixels" else 0
    return block * block + block * shortlist + refine


def mib(floats: float) -> str:
    """float32 count -> MiB, 3 significant figures."""
    return f"{floats * 4 / MIB:.3g}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The per-size table and the growth ratios, in markdown."""
    base = results[0]
    per_n2 = lambda r: r["knn_s"] / r["n"] ** 2  # noqa: E731
    labels = args.labels
    head = [
        "N",
        "hash rows/s",
        "embed rows/s",
        "kNN rows/s",
        "kNN s",
        "kNN s/N² (rel.)",
        "kNN task MiB",
        "N×N MiB",
        "keys MiB (shared)",
    ] + (["labels rows/s"] if labels else [])
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for r in results:
        b = min(args.block_rows, r["n"])
        m = min(args.shortlist, r["n"])
        cells = [
            f"{r['n']}",
            f"{r['n'] / r['hash_s']:.0f}",
            f"{r['n'] / r['embed_s']:.0f}",
            f"{r['n'] / r['knn_s']:.0f}",
            f"{r['knn_s']:.2f}",
            f"{per_n2(r) / per_n2(base):.2f}",
            mib(task_floats(b, m, args.embedder)),
            mib(r["n"] ** 2),
            mib(r["keys_floats"]),
        ]
        if labels:
            cells.append(f"{r['n'] / r['labels_s']:.0f}")
        print("| " + " | ".join(cells) + " |")
    top = results[-1]
    n_ratio = top["n"] / base["n"]
    print(f"\nGrowth from N={base['n']} to N={top['n']}: N ratio {n_ratio:.2f}, N² ratio {n_ratio**2:.2f}\n")
    print("| step | s at smallest | s at largest | time ratio | ÷ N ratio | ÷ N² ratio | marginal rows/s (ΔN/Δs) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    steps = [("hash", "hash_s"), ("embed", "embed_s"), ("kNN", "knn_s")] + ([("labels", "labels_s")] if labels else [])
    for name, key in steps:
        g = top[key] / base[key]
        dt = top[key] - base[key]
        marginal = f"{(top['n'] - base['n']) / dt:.0f}" if dt > 0 and name != "kNN" else "—"
        print(
            f"| {name} | {base[key]:.2f} | {top[key]:.2f} | {g:.2f} | {g / n_ratio:.2f} | {g / n_ratio**2:.2f} | "
            f"{marginal} |"
        )
    print(
        "\n(÷ N ratio ≈ 1: linear; ÷ N² ratio ≈ 1: quadratic; below both: a fixed per-pass cost (Ray Data planning, "
        "actor start-up, task dispatch) still dominates at these sizes. Marginal rows/s leaves that fixed cost out; "
        "not given for the kNN, whose cost per row grows with N.)"
    )
    b = args.block_rows
    print(
        f"\nkNN memory per task: at most {mib(task_floats(b, args.shortlist, args.embedder))} MiB (block_rows={b}: "
        f"{b}² + {b}·{args.shortlist} shortlist similarities"
        + (
            f", and {REFINE_ROWS} queries' {pixels.VIEWS} views and {args.shortlist} candidates' fine descriptors"
            if args.embedder == "pixels"
            else ""
        )
        + ") whatever N; the keys sit once in the object store, mapped zero-copy by every task: linear in N."
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet", default=str(ROOT.parent / "shared" / "data" / "cifar10-train.parquet"))
    p.add_argument(
        "--data",
        default="",
        help="a prepared dataset to take the sizes from (its train split); default: prepare one from --parquet",
    )
    p.add_argument("--sizes", default="2500,5000,10000", help="comma-separated row counts")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--actors", type=int, default=2, help="most embedding actors (effray data clean --actors)")
    p.add_argument("--block-rows", type=int, default=2048, help="kNN rows per block (effray data clean --block-rows)")
    p.add_argument("--neighbours", type=int, default=5, help="k of the kNN")
    p.add_argument("--shortlist", type=int, default=50, help="the first pass's candidates per image")
    p.add_argument("--embedder", default="pixels", choices=("pixels", "classifier"), help="what the kNN compares")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--checkpoint", default="", help="embed with this effray checkpoint instead of a fresh convnet")
    p.add_argument(
        "--train-epochs",
        type=int,
        default=0,
        help="train the embedding model this long on the smallest size first (0 = random init)",
    )
    p.add_argument("--labels", action="store_true", help="also time label issues (trains --folds models per size)")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--label-epochs", type=int, default=1)
    p.add_argument(
        "--knn-repeat",
        type=int,
        default=2,
        help="kNN runs per size, the fastest kept (Ray may have to start "
        "fresh worker processes for the first: the passes before it recycle the pool)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pass")
    args = p.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})

    print(f"{cpu_summary()}, {os.cpu_count()} cores, Ray num_cpus={args.cpus}", flush=True)
    work = tempfile.mkdtemp(prefix="effray-bench-clean-")
    try:
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        data = args.data
        if not data:
            data = os.path.join(work, "data")
            prepare(
                PrepareConfig(
                    source=f"parquet:{args.parquet}", out=data, limit=max(sizes), val_fraction=0.0, test_fraction=0.0
                )
            )
        total = load_meta(data)["counts"]["train"]
        if max(sizes) > total:
            print(f"(sizes above the {total} train rows of {data} dropped)")
            sizes = [n for n in sizes if n <= total] or [total]
        dirs = subsets(data, sizes, work)
        meta = load_meta(dirs[sizes[0]])
        payload, what = None, "none (pixels)"
        if args.embedder == "classifier":
            ckpt, what = make_checkpoint(args, dirs[sizes[0]], work)
            payload = check_checkpoint(ckpt, meta)  # as `effray data clean --checkpoint` loads it
        cfg = CleanConfig(
            actors=args.actors,
            block_rows=args.block_rows,
            neighbours=args.neighbours,
            shortlist=args.shortlist,
            embedder=args.embedder,
        )
        print(
            f"sizes {sizes}; embedder {args.embedder}, model: {what}; {args.actors} embedding actor(s), "
            f"GPUs per actor {embed_gpus(cfg):g}; "
            f"kNN k={args.neighbours}, block_rows={args.block_rows}"
            + (
                f"; labels: {args.folds} folds x {args.label_epochs} epoch(s) of {args.model} x{args.width}"
                if args.labels
                else ""
            ),
            flush=True,
        )
        if not args.no_warmup:
            time_hash(dirs[sizes[0]])
            _, emb = time_embed(dirs[sizes[0]], payload, cfg)
            time_knn(emb, int(meta["image_shape"][2]), cfg)
        results = []
        for n in sizes:
            d = dirs[n]
            hash_s, _ = time_hash(d)
            embed_s, emb = time_embed(d, payload, cfg)
            knn_times, key_floats = time_knn(emb, int(meta["image_shape"][2]), cfg, args.knn_repeat)
            knn_s = min(knn_times)
            r = {"n": n, "hash_s": hash_s, "embed_s": embed_s, "knn_s": knn_s, "keys_floats": key_floats}
            if args.labels:
                r["labels_s"] = time_labels(d, args, work)
            results.append(r)
            print(
                f"N={n}: hash {hash_s:.2f} s, embed {embed_s:.2f} s, kNN {knn_s:.2f} s "
                f"(best of {', '.join(f'{t:.2f}' for t in knn_times)})"
                + (f", labels {r['labels_s']:.2f} s" if args.labels else ""),
                flush=True,
            )
        report(results, args)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
