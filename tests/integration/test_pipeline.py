"""The Ray Data pipeline on real CIFAR-10 images: shapes, normalisation, epochs, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from effray.cli import main
from effray.data.clock import kill_clock
from effray.data.pipeline import DataConfig, eval_dataset, torch_batches, train_dataset
from effray.data.prepare import load_meta

pytestmark = pytest.mark.usefixtures("ray_session")


def _epoch(ds, meta, clock, epoch, **kw):
    batches = list(torch_batches(ds, meta, 128, clock=clock, epoch=epoch, **kw))
    out = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
    order = np.argsort(out["index"])  # Ray Data doesn't promise order; rows carry their index
    return {k: v[order] for k, v in out.items()}


def test_streams_normalised_augmented_tensors(tiny_cifar):
    meta = load_meta(tiny_cifar)
    clock = "test-stream"
    ds = train_dataset(DataConfig(data=str(tiny_cifar), augment="crop(4)|flip|cutout(8)", seed=1), clock=clock)
    try:
        e0 = _epoch(ds, meta, clock, 0)
        e0_again = _epoch(ds, meta, clock, 0)
        e1 = _epoch(ds, meta, clock, 1)
        raw = _epoch(ds, meta, clock, 0, normalise=False, channels_last=True)
    finally:
        kill_clock(clock)
    assert e0["image"].shape == (540, 3, 32, 32) and e0["image"].dtype == np.float32
    assert e0["label"].dtype == np.int64 and set(np.unique(e0["label"])) == set(range(10))
    # normalised with the dataset's statistics: roughly zero mean, unit std per channel
    assert np.abs(e0["image"].mean(axis=(0, 2, 3))).max() < 0.25
    assert 0.7 < e0["image"].std(axis=(0, 2, 3)).mean() < 1.3
    # cutout fills zeros before normalisation: the value -mean/std shows up in 8x8 squares
    zero_level = (-np.asarray(meta["mean"]) / np.asarray(meta["std"]))[0]
    assert (np.abs(e0["image"][:, 0] - zero_level) < 1e-4).mean() > 0.03
    # same seed + epoch -> identical augmentations; a new epoch -> fresh randomness
    np.testing.assert_array_equal(e0["image"], e0_again["image"])
    assert np.abs(e0["image"] - e1["image"]).mean() > 0.1
    np.testing.assert_array_equal(e0["label"], e1["label"])
    # normalisation is (x/255 - mean)/std of the raw augmented uint8 batch
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (540, 32, 32, 3)
    expected = (raw["image"] / 255.0 - np.asarray(meta["mean"])) / np.asarray(meta["std"])
    np.testing.assert_allclose(e0["image"], expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_the_decoded_split_is_cached_and_only_random_ops_rerun(tiny_cifar):
    from ray.data.dataset import MaterializedDataset

    meta = load_meta(tiny_cifar)
    cached = train_dataset(DataConfig(data=str(tiny_cifar), augment="none"), clock="")
    gpu_side = train_dataset(DataConfig(data=str(tiny_cifar), augment="flip", augment_on="gpu"), clock="")
    streamed = train_dataset(DataConfig(data=str(tiny_cifar), augment="none", cache_decoded=False), clock="")
    assert isinstance(cached, MaterializedDataset) and isinstance(gpu_side, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset)
    e0, e1 = _epoch(cached, meta, "", 0), _epoch(cached, meta, "", 1)
    assert len(e0["index"]) == 540
    np.testing.assert_array_equal(e0["image"], e1["image"])  # the same decoded pixels every epoch
    np.testing.assert_array_equal(e0["image"], _epoch(eval_dataset(tiny_cifar, "train"), meta, "", 0)["image"])
    np.testing.assert_array_equal(e0["image"], _epoch(streamed, meta, "", 0)["image"])
    # random ops run on the cached rows every epoch: fresh draws per epoch, and exactly the
    # draws the uncached stream makes for the same seed and epoch
    clock = "cache-test"
    try:
        ds = train_dataset(DataConfig(data=str(tiny_cifar), augment="crop(4)|flip", seed=3), clock=clock)
        plain = train_dataset(
            DataConfig(data=str(tiny_cifar), augment="crop(4)|flip", seed=3, cache_decoded=False), clock=clock
        )
        a0, a1, p0 = _epoch(ds, meta, clock, 0), _epoch(ds, meta, clock, 1), _epoch(plain, meta, clock, 0)
    finally:
        kill_clock(clock)
    assert np.abs(a0["image"] - a1["image"]).mean() > 0.1
    np.testing.assert_array_equal(a0["image"], p0["image"])
    np.testing.assert_array_equal(a0["index"], p0["index"])


def test_mixup_gives_soft_targets(tiny_cifar):
    ds = train_dataset(DataConfig(data=str(tiny_cifar), augment="flip|mixup(0.4)"), clock="")
    batch = next(iter(torch_batches(ds, load_meta(tiny_cifar), 64)))
    target = batch["target"].numpy()
    assert target.shape == (64, 10)
    np.testing.assert_allclose(target.sum(axis=1), 1.0, atol=1e-5)


def test_eval_dataset_is_deterministic_and_complete(tiny_cifar):
    meta = load_meta(tiny_cifar)
    a = _epoch(eval_dataset(tiny_cifar, "val"), meta, "", 0)
    b = _epoch(eval_dataset(tiny_cifar, "val"), meta, "", 0)
    assert a["image"].shape == (60, 3, 32, 32)
    np.testing.assert_array_equal(a["image"], b["image"])


def test_unknown_policy_fails_before_streaming(tiny_cifar, capsys, tmp_path):
    code = main(
        ["data", "preview", "--data", str(tiny_cifar), "--augment", "crop(4)|twirl", "--grid", str(tmp_path / "g.png")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "twirl" in err and "flip" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_preview_command_writes_grid(tiny_cifar, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "data",
                "preview",
                "--data",
                str(tiny_cifar),
                "--augment",
                "strong",
                "--epochs",
                "1",
                "--grid",
                str(grid),
                "--grid-rows",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"images_per_s"' in out
    img = np.asarray(Image.open(grid))
    assert img.shape == (4 * 34, 4 * 34, 3) and img.std() > 20


def test_synthetic_rows_mix_in_at_the_requested_ratio(tiny_cifar, tmp_path):
    from effray.data.prepare import PrepareConfig, prepare

    synthetic = tmp_path / "synthetic"
    prepare(PrepareConfig(source="synthetic:200", out=str(synthetic), val_fraction=0.1, test_fraction=0.0))
    cfg = DataConfig(data=str(tiny_cifar), augment="flip", synthetic=str(synthetic), synthetic_ratio=0.25)
    meta = load_meta(tiny_cifar)
    rows = _epoch(train_dataset(cfg, clock=""), meta, "", 0)
    n_syn = int(rows["synthetic"].sum())
    assert n_syn == round(0.25 / 0.75 * 540) == 180  # 25% of the stream
    assert len(rows["label"]) == 540 + n_syn
    with pytest.raises(Exception, match="needs 270 synthetic rows"):
        train_dataset(DataConfig(data=str(tiny_cifar), synthetic=str(synthetic), synthetic_ratio=1 / 3), clock="")
    # the exact-shuffle cache holds the same mix, synthetic rows flagged (their keys apart)
    import ray

    from effray.data.shuffle import cache_split

    cached = ray.get(cache_split(cfg).ref)
    assert len(cached["label"]) == 720 and int(cached["synthetic"].sum()) == 180
    assert sorted(cached["index"][cached["synthetic"]].tolist()) == sorted(rows["index"][rows["synthetic"]].tolist())


def test_datasets_carry_effray_block_size_and_a_bounded_stream_buffer(tiny_cifar, monkeypatch):
    """Every dataset built from a split keeps effray's block size and an object-store
    budget, through map_batches, materialize and into Ray Train's ingest options; the
    driver's global DataContext stays as it was."""
    import ray
    from ray.data import DataContext, ExecutionResources

    from effray.data import pipeline
    from effray.train.parallel import STRATEGIES

    mib = 1 << 20
    cpus = int(ray.cluster_resources()["CPU"])
    # 2 blocks of the split per CPU within [1, 16] MiB: CIFAR-10's 150 MB is 16 MiB blocks on
    # 2 CPUs, 1.2 MiB on 64 (Ray's 128 MiB default: 2 blocks, 2 augmentation tasks)
    assert pipeline.block_bytes(50000 * 3072, 2) == 16 * mib
    assert pipeline.block_bytes(50000 * 3072, 64) == 50000 * 3072 // 128
    assert pipeline.block_bytes(540 * 3072, cpus) == mib
    auto = max(256 * mib, 4 * mib * cpus)
    before = DataContext.get_current().target_max_block_size
    for augment, cache in (("flip", True), ("flip", False), ("none", True)):
        ds = train_dataset(DataConfig(data=str(tiny_cifar), augment=augment, cache_decoded=cache), clock="")
        assert ds.context.target_max_block_size == mib
        assert ds.context.execution_options.resource_limits.object_store_memory == auto
    assert eval_dataset(tiny_cifar, "val").context.target_max_block_size == mib
    assert DataContext.get_current().target_max_block_size == before
    small = train_dataset(DataConfig(data=str(tiny_cifar), augment="flip", stream_buffer_mb=64), clock="")
    assert small.context.execution_options.resource_limits.object_store_memory == 64 * mib
    # Ray Train would replace the dataset's options with the driver's: both strategies carry the budget
    for name in ("ddp", "pipeline"):
        options = STRATEGIES.get(name).dataset_config(train_ds=small)._resolve_execution_options("train")
        assert options.resource_limits.object_store_memory == 64 * mib and options.preserve_order
    # a tighter limit someone set on the driver's context wins
    ctx = DataContext.get_current()
    monkeypatch.setattr(
        ctx.execution_options, "resource_limits", ExecutionResources.for_limits(object_store_memory=32 * mib)
    )
    tight = train_dataset(DataConfig(data=str(tiny_cifar), augment="flip"), clock="")
    assert tight.context.execution_options.resource_limits.object_store_memory == 32 * mib
    monkeypatch.undo()
    # the cached split really is cut into blocks of that size, so augmentation spreads out
    monkeypatch.setattr(pipeline, "MIN_BLOCK_BYTES", 64 << 10)
    cut = train_dataset(DataConfig(data=str(tiny_cifar), augment="none"), clock="")
    block = pipeline.block_bytes(540 * 3072, cpus)
    assert block < mib and cut.num_blocks() >= 540 * 3072 // block - 1
    monkeypatch.undo()
    assert pipeline.map_batch_rows({"image_shape": [32, 32, 3]}) == 2048
    assert pipeline.map_batch_rows({"image_shape": [224, 224, 3]}) == 55
    with pytest.raises(Exception, match="--stream-buffer-mb must be >= 0"):
        DataConfig(data=str(tiny_cifar), stream_buffer_mb=-1).validate()


def test_streaming_reads_parquet_without_footer_reader_actors(tiny_cifar):
    """A streamed epoch starts no FooterReader actor (Ray's default Parquet reader starts a
    pool of them, new processes, on every execution), whatever the environment says:
    nothing here sets RAY_DATA_USE_DATASOURCE_V2."""
    import os

    from ray.util.state import list_actors

    assert "RAY_DATA_USE_DATASOURCE_V2" not in os.environ

    def footer_readers() -> int:
        return len(list_actors(filters=[("class_name", "=", "FooterReader")], limit=10000))

    before = footer_readers()
    ds = train_dataset(DataConfig(data=str(tiny_cifar), augment="flip", cache_decoded=False), clock="")
    assert len(_epoch(ds, load_meta(tiny_cifar), "", 0)["label"]) == 540
    assert footer_readers() == before


def test_exact_shuffle_deals_each_row_once_per_epoch_over_1_2_3_ranks(tiny_cifar):
    """The cached split through Ray Data: every epoch each of 1, 2 or 3 replicas streams
    its share of one permutation, in order; the shares are disjoint and cover every row;
    a new epoch reorders and re-deals them; the same seed repeats rows and pixels."""
    from effray.data.shuffle import cache_split, epoch_dataset, replica_rows

    meta = load_meta(tiny_cifar)
    import dataclasses

    source = cache_split(DataConfig(data=str(tiny_cifar), augment="crop(2)|altflip", seed=3))
    assert source is not None and source.rows == 540
    # CIFAR-sized tasks would take these 540 rows in one: cut them smaller, so that an
    # epoch spans several tasks, each augmenting in several calls
    source = dataclasses.replace(source, task_rows=100, map_rows=40)

    def stream(epoch: int, rank: int, world: int, src=source) -> dict[str, np.ndarray]:
        batches = list(torch_batches(epoch_dataset(src, epoch, rank, world, 60), meta, 60 // world, normalise=False))
        assert {len(b["label"]) for b in batches} == {60 // world}  # 540 = 9 global batches of 60
        return {k: np.concatenate([b[k].numpy() for b in batches]) for k in ("index", "image")}

    import ray

    index = ray.get(source.ref)["index"]  # each cached row's own index
    for world in (1, 2, 3):
        shares = [stream(1, r, world) for r in range(world)]
        union = np.concatenate([s["index"] for s in shares])
        assert len(union) == 540 and set(union.tolist()) == set(index.tolist()), world
        for r, s in enumerate(shares):  # in the order of the epoch's permutation
            np.testing.assert_array_equal(s["index"], index[replica_rows(540, 3, 1, r, world, 60)])
    # altflip depends on (seed, epoch, row) alone: a row comes out alike on any world size
    flip_only = cache_split(DataConfig(data=str(tiny_cifar), augment="altflip", seed=3))
    seen = {}
    for world in (1, 3):
        shares = [stream(4, r, world, flip_only) for r in range(world)]
        seen[world] = dict(
            zip(
                np.concatenate([s["index"] for s in shares]).tolist(),
                np.concatenate([s["image"] for s in shares]),
                strict=True,
            )
        )
    assert all(np.array_equal(seen[1][i], seen[3][i]) for i in seen[1])

    again = stream(1, 1, 2)
    np.testing.assert_array_equal(again["index"], index[replica_rows(540, 3, 1, 1, 2, 60)])
    first = stream(1, 1, 2)
    np.testing.assert_array_equal(again["image"], first["image"])  # the same seed: the same pixels
    other = stream(2, 1, 2)
    assert set(other["index"].tolist()) != set(first["index"].tolist())  # the next epoch re-deals the rows


def test_every_stream_runs_on_the_data_cpus_the_trainers_leave(tiny_cifar):
    """Trainers holding all but --data-cpus 0.5 of the cluster (2 workers of 0.75 CPU on 2):
    the exact shuffle's epoch (built in the worker), a streamed epoch and an evaluation pass
    (built on the driver before the fit, as effray.train.run does) each finish. Their first
    task (a read, or the exact shuffle's chunk numbers) once asked for a whole CPU, which
    never came free, and training hung with Ray's "resources are not enough"."""
    import threading

    import ray

    from effray.data.shuffle import cache_split, epoch_dataset

    meta = load_meta(tiny_cifar)
    source = cache_split(DataConfig(data=str(tiny_cifar), augment="flip"), num_cpus=0.5)
    streamed = train_dataset(DataConfig(data=str(tiny_cifar), cache_decoded=False), num_cpus=0.5)
    evaluation = eval_dataset(tiny_cifar, "val", num_cpus=0.5)
    streams = {
        "exact shuffle": lambda: epoch_dataset(source, 0, 0, 1, 128),
        "streamed": lambda: streamed,
        "evaluation": lambda: evaluation,
    }
    trainers = ray.remote(num_cpus=1.5)(type("Trainers", (), {"ready": lambda self: True})).remote()
    ray.get(trainers.ready.remote())
    seen: dict[str, int] = {}

    def read(name: str) -> None:
        seen[name] = sum(len(b["label"]) for b in torch_batches(streams[name](), meta, 128))

    try:
        for name in streams:
            worker = threading.Thread(target=read, args=(name,), daemon=True)
            worker.start()
            worker.join(timeout=90)
            assert not worker.is_alive(), f"the {name} stream waits for a CPU the trainers hold"
    finally:
        ray.kill(trainers)
    assert seen == {"exact shuffle": 540, "streamed": 540, "evaluation": 60}
