"""Memory and images/s of effray's Ray Data stream at 224 px: 1x against 4x the images.

The real Imagenette file (3,000 JPEGs at 224 x 224) is prepared once (``--image-size``, as
any source of other or mixed sizes would be) and streamed from Parquet the way `effray
train` reads data bigger than its object-store share (``--no-cache-decoded``), with
ImageNet's training augmentation (``random_resized_crop(224)|flip``) in Ray Data tasks and
the normalisation in this process. The same stream then runs over 4x the rows (the split
linked four times). Each size streams twice and the second pass is measured (the first
warms the worker processes), as in ``bench/data_throughput.py``, whose :class:`PeakMemory`
(PSS of this process and the Ray processes it started) it uses. The last lines are the ratios: peak
memory 4x / 1x (flat = bounded) and images/s 4x / 1x.

It also prints what the decoded split would take in the object store at each size against
the quarter that effray caches (4x passes it: that size streams whatever the flag says),
and the cached 1x stream's peak for reference.

    python bench/image_size.py [--parquet ../shared/data/imagenette-train.parquet] [--rows 3000]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from data_throughput import PeakMemory, replicate

from effray.data.clock import kill_clock
from effray.data.pipeline import DataConfig, fits_object_store, torch_batches, train_dataset
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.hardware import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
POLICY = "random_resized_crop(224)|flip"


def stream(data_dir: str, batch_size: int, policy: str, cache: bool, passes: int = 2) -> tuple[float, int, int]:
    """``passes`` epochs of the training stream; (images/s, peak PSS bytes, rows) of the last."""
    cfg = DataConfig(data=data_dir, augment=policy, shuffle_buffer=0, cache_decoded=cache)
    clock = f"bench-size-{os.getpid()}-{time.time_ns()}"
    ds = train_dataset(cfg, clock=clock)
    meta = load_meta(data_dir)
    rate, peak, seen = 0.0, 0, 0
    for epoch in range(passes):
        with PeakMemory() as mem:
            start, seen = time.perf_counter(), 0
            for batch in torch_batches(ds, meta, batch_size, clock=clock, epoch=epoch):
                seen += len(batch["label"])
            rate = seen / (time.perf_counter() - start)
        peak = mem.peak
    kill_clock(clock)
    return rate, peak, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet", default=str(ROOT.parent / "shared" / "data" / "imagenette-train.parquet"))
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policy", default=POLICY)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="effray-bench-size-")
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        data = os.path.join(work, "data")
        t = time.perf_counter()
        prepare(
            PrepareConfig(
                source=args.parquet,
                out=data,
                limit=args.rows,
                val_fraction=0.0,
                test_fraction=0.0,
                image_size=args.image_size,
            )
        )
        meta = load_meta(data)
        n = meta["counts"]["train"]
        print(cpu_summary())
        print(
            f"rows={n} image_shape={meta['image_shape']} batch_size={args.batch_size} cores={os.cpu_count()} "
            f"policy={args.policy!r} prepare_s={time.perf_counter() - t:.1f}"
        )
        x4 = replicate(data, 4, os.path.join(work, "x4"))
        store = ray.cluster_resources().get("object_store_memory", 0)
        for name, d in (("1x", data), ("4x", x4)):
            m = load_meta(d)
            decoded = m["counts"]["train"] * int(np.prod(m["image_shape"]))
            print(
                f"decoded_{name}_mb={decoded / 2**20:.0f} object_store_quarter_mb={store / 4 / 2**20:.0f} "
                f"cached={'yes' if fits_object_store(m) else 'no (streams)'}"
            )
        cached, cached_peak, _ = stream(data, args.batch_size, args.policy, cache=True)
        print(f"cached_1x_images_per_s={cached:.0f} cached_1x_peak_pss_mb={cached_peak / 2**20:.0f}")
        rate1, peak1, rows1 = stream(data, args.batch_size, args.policy, cache=False)
        print(f"streaming_1x_images_per_s={rate1:.0f} streaming_1x_peak_pss_mb={peak1 / 2**20:.0f} rows={rows1}")
        rate4, peak4, rows4 = stream(x4, args.batch_size, args.policy, cache=False)
        print(f"streaming_4x_images_per_s={rate4:.0f} streaming_4x_peak_pss_mb={peak4 / 2**20:.0f} rows={rows4}")
        print(f"ratio_peak_pss_4x_vs_1x={peak4 / peak1:.2f} (streaming; 1.00 = flat)")
        print(f"ratio_images_per_s_4x_vs_1x={rate4 / rate1:.2f}")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
