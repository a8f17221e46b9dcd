"""`effray serve` over real HTTP on 127.0.0.1 (a free port; one Serve start for the module,
shut down at its end): the answers equal the model run in-process, a JSON batch equals the
single answers, concurrent requests share model calls (the replica's /stats shows the
calls' sizes), an image of another size is resized by the model's preprocessing and the
answer says so, and every kind of bad request gets its 4xx while the server keeps serving."""

from __future__ import annotations

import base64
import json
import socket
import threading

import numpy as np
import pytest
from helpers import call, cli, png

from effray.cluster import free_port
from effray.data.arrays import load_arrays
from effray.data.augment import preprocess_image
from effray.data.prepare import load_meta
from effray.deploy.config import ServeConfig
from effray.deploy.model import load_deployable, softmax
from effray.deploy.serve import bind_warning, start, stop, url_of
from effray.errors import EffrayError

MAX_REQUEST_BYTES = 32 << 10  # a 32x32 PNG is ~3 KB, 4 of them in base64 JSON ~14 KB
MAX_IMAGES = 4
MAX_PIXELS = 4_000_000
BATCH = 8


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_cifar, teacher):
    """The app on a free loopback port; batches of up to 8, filled for up to 0.2 s, so
    concurrent requests from a test's threads meet in one model call."""
    cfg = ServeConfig(
        model=str(teacher),
        host="127.0.0.1",
        port=free_port(),
        max_batch_size=BATCH,
        batch_wait_timeout_s=0.2,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_images_per_request=MAX_IMAGES,
        max_image_pixels=MAX_PIXELS,
    )
    url = start(cfg)
    try:
        yield url
    finally:
        stop()
    # nothing left for the modules after this one: no application, and nothing listens on the port
    # (SO_REUSEADDR: the closed connections' TIME_WAIT doesn't count, a listener does)
    from ray import serve

    assert not serve.status().applications
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", cfg.port))


@pytest.fixture(scope="module")
def val(tiny_cifar, teacher):
    """Eight validation images, their PNGs, and the teacher's in-process probabilities."""
    images = load_arrays(tiny_cifar, "val", limit=8)["image"]
    return {
        "images": images,
        "pngs": [png(img) for img in images],
        "probs": softmax(load_deployable(teacher, device="cpu").logits(images)),
    }


def assert_same_answer(got: dict, want: dict) -> None:
    assert (got["label"], got["class_name"]) == (want["label"], want["class_name"])
    assert [t["label"] for t in got["top5"]] == [t["label"] for t in want["top5"]]
    np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5)


def test_healthz_names_the_model(endpoint, tiny_cifar, teacher):
    status, body = call(endpoint, "/healthz")
    assert status == 200 and body["status"] == "ok" and body["kind"] == "checkpoint"
    assert body["classes"] == load_meta(tiny_cifar)["classes"] and body["image_shape"] == [32, 32, 3]
    assert body["source"] == str(teacher.absolute())
    assert endpoint.startswith("http://127.0.0.1:")


def test_one_png_gets_the_models_class_probabilities_and_provenance(endpoint, val, tiny_cifar):
    classes = load_meta(tiny_cifar)["classes"]
    for i in range(3):
        status, body = call(endpoint, "/predict", val["pngs"][i])
        assert status == 200, body
        want = int(val["probs"][i].argmax())
        assert (body["label"], body["class_name"]) == (want, classes[want])
        probs = np.array([body["probabilities"][c] for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(probs, val["probs"][i], atol=1e-5)
        top = [t["probability"] for t in body["top5"]]
        assert len(top) == 5 and top == sorted(top, reverse=True) and body["top5"][0]["label"] == want
        assert body["probability"] == pytest.approx(val["probs"][i].max(), abs=1e-5)
        assert body["model"]["kind"] == "checkpoint" and body["model"]["provenance"]["format"] is not None


def test_a_json_batch_equals_the_single_answers(endpoint, val):
    batch = [base64.b64encode(p).decode() for p in val["pngs"][:MAX_IMAGES]]
    status, body = call(endpoint, "/predict", json.dumps({"images": batch}).encode(), "application/json")
    assert status == 200, body
    assert len(body["predictions"]) == MAX_IMAGES
    for i, got in enumerate(body["predictions"]):
        assert_same_answer(got, call(endpoint, "/predict", val["pngs"][i])[1])


def test_concurrent_requests_share_model_calls(endpoint, val):
    _, before = call(endpoint, "/stats")
    answers: list[tuple[int, dict] | None] = [None] * BATCH
    go = threading.Barrier(BATCH)

    def client(i: int) -> None:
        go.wait()
        answers[i] = call(endpoint, "/predict", val["pngs"][i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _, after = call(endpoint, "/stats")
    calls = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    calls = {k: v for k, v in calls.items() if v}
    assert sum(k * v for k, v in calls.items()) == BATCH  # every image went through exactly one model call ...
    assert max(calls) > 1 and sum(calls.values()) < BATCH, calls  # ... and some calls held several requests
    for i, (status, body) in enumerate(answers):
        assert status == 200 and body["label"] == int(val["probs"][i].argmax())
        np.testing.assert_allclose(list(body["probabilities"].values()), val["probs"][i], atol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "too many pixels",
        "too large",
        "too large, no length",
        "empty",
        "too many images",
        "bad json",
        "bad base64",
        "unknown route",
        "wrong method",
    ],
)
def test_a_bad_request_gets_a_4xx_with_its_reason_and_the_server_keeps_serving(endpoint, val, case):
    b64 = base64.b64encode(val["pngs"][0]).decode()
    status, body = {
        "not an image": lambda: call(endpoint, "/predict", b"hello, not a picture"),
        "too many pixels": lambda: call(endpoint, "/predict", png(np.zeros((2048, 2048, 3), np.uint8))),
        "too large": lambda: call(endpoint, "/predict", b"\x89PNG" + bytes(MAX_REQUEST_BYTES)),
        "too large, no length": lambda: call(endpoint, "/predict", b"\x89PNG" + bytes(MAX_REQUEST_BYTES), chunked=True),
        "empty": lambda: call(endpoint, "/predict", b""),
        "too many images": lambda: call(
            endpoint, "/predict", json.dumps({"images": [b64] * (MAX_IMAGES + 1)}).encode(), "application/json"
        ),
        "bad json": lambda: call(endpoint, "/predict", b'{"images": [', "application/json"),
        "bad base64": lambda: call(
            endpoint, "/predict", json.dumps({"images": [b64, "%%%"]}).encode(), "application/json"
        ),
        "unknown route": lambda: call(endpoint, "/nope"),
        "wrong method": lambda: call(endpoint, "/healthz", b"x"),
    }[case]()
    want_status, want_reason = {
        "not an image": (400, "not an image"),
        "too many pixels": (413, "2048x2048 (WxH), over the 4,000,000-pixel limit"),
        "too large": (413, f"over the {MAX_REQUEST_BYTES}-byte limit"),
        "too large, no length": (413, f"over the {MAX_REQUEST_BYTES}-byte limit"),
        "empty": (400, "empty body"),
        "too many images": (400, f"{MAX_IMAGES + 1} images in one request, at most {MAX_IMAGES}"),
        "bad json": (400, "not valid JSON"),
        "bad base64": (400, "images[1] is not valid base64"),
        "unknown route": (404, "no route /nope"),
        "wrong method": (405, "use GET /healthz"),
    }[case]
    assert status == want_status and want_reason in body["error"] and "\n" not in body["error"], body
    status, good = call(endpoint, "/predict", val["pngs"][1])
    assert status == 200 and good["label"] == int(val["probs"][1].argmax())


def test_an_image_of_another_size_is_resized_by_the_models_preprocessing_and_the_answer_says_so(endpoint, val, teacher):
    small = val["images"][0][:16, :16]
    status, body = call(endpoint, "/predict", png(small))
    info = load_deployable(teacher, device="cpu").info
    want = softmax(load_deployable(teacher, device="cpu").logits(preprocess_image(small, info.resize)[None]))[0]
    assert status == 200 and body["label"] == int(want.argmax())
    np.testing.assert_allclose(list(body["probabilities"].values()), want, atol=1e-5)
    assert body["resized"] == {"from": [16, 16], "to": [32, 32], "preprocess": info.resize}
    status, same = call(endpoint, "/predict", val["pngs"][0])  # one of the model's size: nothing to say
    assert status == 200 and "resized" not in same


def test_a_second_start_is_refused_in_one_line_while_serve_runs(endpoint, teacher):
    cfg = ServeConfig(model=str(teacher), port=free_port())
    with pytest.raises(EffrayError, match="Ray Serve is already running on this cluster"):
        start(cfg)
    assert call(endpoint, "/healthz")[0] == 200  # the running app was left alone


def test_only_a_loopback_bind_is_quiet():
    assert all(bind_warning(h, 8000) is None for h in ("127.0.0.1", "::1", "localhost"))
    for host in ("0.0.0.0", "10.0.0.5"):
        line = bind_warning(host, 8000)
        assert line and "no authentication of its own" in line and "\n" not in line
    assert url_of("0.0.0.0", 8123) == "http://127.0.0.1:8123" and url_of("::1", 80) == "http://[::1]:80"


def test_bad_serve_flags_fail_in_one_line_before_serve_is_touched(endpoint, teacher, tmp_path):
    for extra, message in [
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--gpus-per-replica", "1"], "--gpus-per-replica 1 but the cluster has 0 GPUs"),
    ]:
        rc, res, err = cli("serve", "--model", str(teacher), "--port", str(free_port()), *extra)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and res is None, (extra, err)
    assert call(endpoint, "/healthz")[0] == 200  # the running app was left alone
