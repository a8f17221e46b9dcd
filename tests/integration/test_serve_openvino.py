"""`effray serve` of an OpenVINO export over real HTTP (its own module: Serve has one HTTP
port per cluster, so this starts after test_serve.py's endpoint has shut down): the file
`effray export --format openvino` writes is what the replica runs, and its answers equal
the same file run in-process through OpenVINO."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import call, cli, png

from effray.cluster import free_port
from effray.data.arrays import load_arrays
from effray.data.prepare import load_meta
from effray.deploy.config import ServeConfig
from effray.deploy.model import load_deployable, softmax
from effray.deploy.serve import start, stop


@pytest.fixture(scope="module")
def exported(ray_session, teacher, tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "export"
    rc, summary, err = cli(
        "export", "--artifact", str(teacher), "--format", "openvino", "--data", str(tiny_cifar), "--out", str(out)
    )
    assert rc == 0, err
    assert summary["parity"]["openvino"]["agreement"] >= 0.999, summary["parity"]
    return out


def test_an_openvino_export_serves_the_answers_openvino_gives_in_process(exported, tiny_cifar):
    images = load_arrays(tiny_cifar, "val", limit=4)["image"]
    want = softmax(load_deployable(exported, kind="openvino", device="cpu").logits(images))
    classes = load_meta(tiny_cifar)["classes"]
    url = start(ServeConfig(model=str(exported), kind="openvino", host="127.0.0.1", port=free_port()))
    try:
        status, health = call(url, "/healthz")
        assert status == 200 and health["kind"] == "openvino", health
        for i, image in enumerate(images):
            status, body = call(url, "/predict", png(image))
            assert status == 200, body
            assert body["label"] == int(want[i].argmax()) and body["model"]["kind"] == "openvino"
            np.testing.assert_allclose([body["probabilities"][c] for c in classes], want[i], atol=1e-5)
    finally:
        stop()
