"""Helpers the tests share (tests/ is on sys.path through its conftest): the real ``effray``
CLI run in-process, an offline wandb run read back, a Tune experiment's trial reports, and
an HTTP call to a served model with a PNG, a model saved as a training checkpoint, real
images labelled by a model's own predictions (what a sensitivity probe scores against). Not in conftest.py: a second
conftest (tests/fake_cuda) would shadow ``from conftest import ...``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from effray.cli import main
from effray.train.checkpoint import save_payload, train_payload

ROOT = Path(__file__).resolve().parents[1]
# the real Imagenette file beside the repository, as the shared CIFAR file is (a clone elsewhere sets this)
IMAGENETTE = Path(
    os.environ.get("EFFRAY_IMAGENETTE_PARQUET", ROOT.parent / "shared" / "data" / "imagenette-train.parquet")
)


def cli(*args: str) -> tuple[int, dict | None, str]:
    """Run the real CLI in-process: (exit code, its JSON line, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), err.getvalue()


def trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reports so far, in order (Tune's ``result.json``, one JSON line each),
    by trial directory name. While a search runs Tune re-copies the file into the
    experiment every second, so a line caught mid-copy is skipped."""
    out = {}
    for f in sorted(experiment.glob("trial_*/result.json")):
        rows = []
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        out[f.parent.name] = rows
    return out


def read_wandb_run(path: Path, wait_s: float = 20.0) -> dict:
    """Run record (id, group, job type), config, history, summary, artifact names and exit
    code of an offline run's ``run-*.wandb`` log (LevelDB-style 32 KiB blocks of protobuf Records after a
    7-byte header). wandb's own process may still be writing the last records for a moment
    after ``finish()`` has returned (seen once in the suite: a record cut short): a log
    whose last record is incomplete is read again, for up to ``wait_s``."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _parse_wandb_run(path.read_bytes())
        except (DecodeError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _parse_wandb_run(data: bytes) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, payloads, buf = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            raise EOFError(f"a record of {length} bytes at {pos} runs past the end of the log ({len(data)} bytes)")
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            payloads.append(buf + chunk if kind == 4 else chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
    out: dict = {
        "id": None,
        "group": None,
        "job_type": None,
        "config": {},
        "history": [],
        "summary": {},
        "artifacts": [],
        "exit_code": None,
    }
    for p in payloads:
        r = pb.Record.FromString(p)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, job_type=r.run.job_type)
        if kind in ("run", "config"):
            items = r.run.config.update if kind == "run" else r.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            out["artifacts"].append(r.artifact.name)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def two_trial_tune(tmp_path: Path, teacher: Path, data: Path, name: str, *flags: str) -> tuple[int, dict | None, str]:
    """`effray tune` of 2 one-epoch trials (prune rate 0.3 or 0.6, 8 bits) on tiny data, no
    scheduler: what the GPU and multi-node tests need to see trials placed."""
    import yaml

    space = tmp_path / f"{name}-space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "prune_rate": {"choice": [0.3, 0.6]},
                "bits": 8,
                "finetune_epochs": 1,
                "finetune_batch_size": 64,
                "calib_batches": 1,
                "int8": False,
            }
        )
    )
    return cli(
        "tune",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--space",
        str(space),
        "--num-samples",
        "2",
        "--scheduler",
        "none",
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        name,
        "--no-wandb",
        "--deploy",
        "off",  # no export per trial: these searches check other things (a flag in flags wins)
        *flags,
    )


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def call(
    url: str, path: str, body: bytes | None = None, content_type: str = "image/png", chunked: bool = False
) -> tuple[int, dict]:
    """(status, JSON body) of one request; ``chunked`` sends the body without a Content-Length."""
    data = iter([body[i : i + 4096] for i in range(0, len(body), 4096)]) if chunked and body else body
    req = urllib.request.Request(
        url + path,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": content_type} if body is not None else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def save_checkpoint(path: str | os.PathLike, model, data: dict | None = None, epoch: int = 1) -> Path:
    """``model`` saved as `effray train` saves a checkpoint (``data``: its data summary), with
    no optimizer state or history: a teacher for the stages that read one."""
    payload = train_payload(
        model_state=model.state_dict(),
        model_spec=model.spec,
        optimizer={},
        scheduler={},
        epoch=epoch,
        config={},
        data=data or {},
        history=[],
        provenance={},
        elapsed_s=0.0,
    )
    return save_payload(path, payload)


def self_labelled(cifar_parquet: Path, model, images: int = 128, batch: int = 64) -> list[tuple]:
    """The file's first ``images`` real CIFAR-10 images, normalised, as ``(images, labels)``
    batches labelled by ``model``'s own predictions: a probe's drop is then its disagreement."""
    import pyarrow.parquet as pq
    import torch

    from effray.data.image_bytes import decode_image
    from effray.data.images import normalize_tensor

    table = pq.ParquetFile(cifar_parquet).read_row_group(0, columns=["image"]).slice(0, images)
    pixels = np.stack([decode_image(b, 3) for b in table.column("image").to_pylist()])
    x = normalize_tensor(torch.from_numpy(pixels), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    with torch.no_grad():
        labels = model(x).argmax(1)
    return [(x[i : i + batch], labels[i : i + batch]) for i in range(0, images, batch)]
