"""``effray data preview``: stream the augmented training split, report throughput, save a grid.

This is the data stage's end-to-end check: it runs the exact pipeline training uses
(Ray Data tasks, epoch clock, normalisation) and shows what the model will see.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import write_file
from effray.config import option, require
from effray.data.clock import kill_clock
from effray.data.pipeline import DataConfig, torch_batches, train_dataset, validate_data_dir


@dataclass(frozen=True)
class PreviewConfig:
    data: DataConfig = DataConfig()
    epochs: int = option(2, "epochs to stream (throughput is reported per epoch)")
    batch_size: int = option(256, "rows per torch batch")
    grid: str = option("augmented.png", "where to write the grid of augmented images (PNG)")
    grid_rows: int = option(8, "rows (and columns) of the grid")

    def validate(self) -> None:
        require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.grid.endswith(".png"), f"--grid must name a .png file, got {self.grid!r}")
        require(1 <= self.grid_rows <= 32, f"--grid-rows must be in 1..32, got {self.grid_rows}")


def save_grid(images: np.ndarray, path: str | Path, rows: int) -> None:
    """Tile uint8 NHWC images into a rows×rows PNG (written to a temp name, then renamed)."""
    from PIL import Image

    n, h, w, c = images.shape
    k = min(rows * rows, n)
    cols = rows
    grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, dtype=np.uint8)
    for i in range(k):
        r, q = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = images[i]
    image = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    write_file(path, lambda tmp: image.save(tmp, format="PNG"))


def preview(cfg: PreviewConfig) -> dict[str, Any]:
    """Stream ``epochs`` epochs; return per-epoch images/s and write the grid.

    The grid shows the augmented uint8 images exactly as they leave Ray Data (before the
    consumer's normalisation); with --augment-on gpu they are unaugmented."""
    meta = validate_data_dir(cfg.data.data)
    clock = f"preview-{uuid.uuid4().hex[:8]}"
    ds = train_dataset(cfg.data, clock=clock)
    rates, first = [], None
    try:
        for epoch in range(cfg.epochs):
            start, seen = time.perf_counter(), 0
            batches = torch_batches(
                ds,
                meta,
                cfg.batch_size,
                clock=clock,
                epoch=epoch,
                seed=cfg.data.seed,
                shuffle_buffer=cfg.data.shuffle_buffer,
                normalise=False,
            )
            for batch in batches:
                seen += len(batch["label"])
                if first is None:
                    first = batch["image"].numpy()
            rates.append(seen / (time.perf_counter() - start))
    finally:
        kill_clock(clock)
    require(first is not None, f"the training split of {cfg.data.data} is empty")
    save_grid(first, cfg.grid, cfg.grid_rows)
    return {
        "images_per_epoch": seen,
        "images_per_s": [round(r, 1) for r in rates],
        "grid": str(Path(cfg.grid).resolve()),
        "policy": cfg.data.augment,
    }
