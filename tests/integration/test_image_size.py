"""Images of any size through the stages on local Ray, on real Imagenette rows (224 px JPEGs):
``data prepare --image-size`` (mixed sizes refused without it, each resized once with it), a
model trained at another size than its rows are stored at (``random_resized_crop``), and its
recorded input size and preprocessing through evaluate, compress, export and the deployed
model; and rank 0's step bar drawn on the driver's terminal. One Ray Train fit in all."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import IMAGENETTE, cli
from PIL import Image

from effray.compress.artifact import load_artifact
from effray.compress.config import CompressConfig, CompressRunConfig
from effray.compress.measure import count_macs
from effray.compress.recipe import compress_local
from effray.compress.run import check_inputs, eval_and_calib
from effray.console import StepState, relay_to, relayed_step_bars
from effray.data.arrays import epoch_batches, load_arrays, prepared_batches
from effray.data.augment import preprocess_image
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig, prepare
from effray.deploy.model import load_deployable
from effray.models.predict import predict_logits
from effray.train.checkpoint import data_summary, read_payload

pytestmark = pytest.mark.usefixtures("ray_session")

INPUT = "resize(size=48)|center_crop(size=48, width=0)"  # what a model trained at 48 px records


@pytest.fixture(scope="module")
def stored64(tmp_path_factory) -> Path:
    """240 Imagenette rows stored at 64 px (a quarter held out)."""
    out = tmp_path_factory.mktemp("size") / "in64"
    prepare(PrepareConfig(source=str(IMAGENETTE), out=str(out), limit=240, image_size=64, val_fraction=0.25))
    return out


@pytest.fixture(scope="module")
def trained(stored64, tmp_path_factory) -> dict:
    """A convnet trained at 48 px from the 64 px rows (the one fit)."""
    rc, res, err = cli(
        "train",
        "--data",
        str(stored64),
        "--model",
        "convnet",
        "--width",
        "0.25",
        "--workers",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "60",
        "--augment",
        "random_resized_crop(48, scale=(0.35, 1))|flip",
        "--storage",
        str(tmp_path_factory.mktemp("runs")),
        "--name",
        "at48",
        "--no-wandb",
    )
    assert rc == 0, err
    return res


def test_mixed_sizes_need_image_size_and_every_image_is_resized_once_with_it(tmp_path):
    table = pq.read_table(IMAGENETTE).slice(0, 8)
    sizes = [(224, 224), (90, 120), (150, 75), (64, 64)] * 2  # (w, h): any size, any aspect
    rows = []
    for data, (w, h) in zip(table.column("image").to_pylist(), sizes):
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((w, h)).save(buf, "PNG")
        rows.append(buf.getvalue())
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": rows, "label": table.column("label"), "name": table.column("name")}), src)
    args = ["data", "prepare", "--source", str(src), "--classes", "10", "--val-fraction", "0", "--test-fraction", "0"]
    rc, _, err = cli(*args, "--out", str(tmp_path / "no"))
    assert rc == 2 and not (tmp_path / "no").exists(), err
    assert any("mixed image sizes" in line and "--image-size" in line for line in err.splitlines()), err
    rc, res, err = cli(*args, "--out", str(tmp_path / "o"), "--image-size", "32")
    assert rc == 0 and res["image_shape"] == [32, 32, 3], err
    stored = load_arrays(tmp_path / "o", "train")
    for i, png in zip(stored["index"], rows):  # torchvision's Resize(32) + CenterCrop(32) of the source image
        x = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).permute(2, 0, 1)
        want = TF.center_crop(TF.resize(x, 32, antialias=True), 32).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(stored["image"][list(stored["index"]).index(i)], want)


def test_a_model_trained_at_another_size_records_it_and_evaluate_repeats_its_validation(trained, stored64):
    payload = read_payload(trained["checkpoint"])
    assert payload["data"]["image_shape"] == [48, 48, 3] and payload["data"]["preprocess"] == INPUT
    rc, res, err = cli("evaluate", "--checkpoint", trained["checkpoint"], "--data", str(stored64))
    assert rc == 0, err
    assert res["count"] == trained["val_count"] == 60
    assert res["accuracy"] == pytest.approx(trained["val_accuracy"], abs=1e-9)  # the 64 px rows resized alike
    assert res["loss"] == pytest.approx(trained["val_loss"], rel=1e-4)


def test_a_student_takes_its_teachers_input_through_compress_export_and_deployment(trained, stored64, tmp_path):
    cfg = CompressConfig(
        teacher=trained["checkpoint"],
        prune_rate=0.5,
        prune_kind="structured",
        bits=4,
        kd_alpha=0.5,
        finetune_epochs=1,
        calib_batches=1,
        int8=False,
    )
    rc = CompressRunConfig(compress=cfg, data=DataConfig(data=str(stored64), augment="flip"), out=str(tmp_path / "c"))
    teacher, _, meta = check_inputs(rc)  # the driver's view of the data: the teacher's preprocessing
    assert meta["preprocess"] == INPUT and meta["model_input"]["image_shape"] == [48, 48, 3]
    evals, _, calib = eval_and_calib(str(stored64), meta, 64, 1)
    assert evals[0][0].shape[1:] == (3, 48, 48) and calib[0][0].shape[1:] == (3, 48, 48)
    arrays = load_arrays(stored64, "train")  # fine-tuned on 64 px flips, each batch brought to 48 px
    train = lambda e: epoch_batches(arrays, meta, 60, policy="flip", seed=0, epoch=e, device="cpu")  # noqa: E731
    out = tmp_path / "artifact"
    data = data_summary(meta, meta["model_input"])
    result = compress_local(teacher, cfg, train, calib, evals, out, data=data, log=lambda line: None)
    student, payload = load_artifact(out)
    assert payload["data"]["image_shape"] == [48, 48, 3] and payload["data"]["preprocess"] == INPUT
    assert (
        result["student"]["macs"] == count_macs(student, (3, 48, 48))["macs"] < count_macs(student, (3, 64, 64))["macs"]
    )
    rc_, res, err = cli("export", "--artifact", str(out), "--format", "torch", "--data", str(stored64))
    assert rc_ == 0, err
    assert res["parity"]["torch"]["agreement"] == 1.0 and res["parity"]["torch"]["images"] == 60
    deployed = load_deployable(out / "export", device="cpu")
    assert deployed.info.image_shape == [48, 48, 3] and deployed.info.preprocess == INPUT
    stored = next(prepared_batches(stored64, "val", 8)[1])[0]  # 64 px: what a server resizes, as evaluation does
    resized = np.stack([preprocess_image(img, deployed.info.resize) for img in stored])
    with torch.no_grad():
        want = predict_logits(student, stored, data["mean"], data["std"], preprocess=INPUT).numpy()
    np.testing.assert_allclose(deployed.logits(resized), want, atol=1e-4)


def test_rank0s_step_bar_is_drawn_on_the_drivers_terminal(capsys):
    with relayed_step_bars("effray-steps-test", every_s=0.05):
        post = relay_to("effray-steps-test")
        post(StepState("epoch 2/3", 7, 10, 1234.0, 0.5))
        time.sleep(1.0)
        post(StepState("epoch 2/3", 10, 10, 1300.0, 0.25, done=True))
        time.sleep(0.5)
    out = capsys.readouterr().out
    assert "epoch 2/3" in out and "7/10" in out and "1,234 img/s, loss 0.5000" in out
