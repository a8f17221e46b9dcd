"""Checkpoints that describe themselves, load safely and survive a corrupt newest copy.

A checkpoint is a directory holding ``model.pt``: one ``torch.save``d dict of plain
types and tensors (so ``torch.load(weights_only=True)`` reads it and nothing else can
run code on load). Its ``format`` key says which builder turns it back into a model;
training writes ``effray.train/1`` and later stages (compression) register their own.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray import __version__
from effray.atomic import write_file
from effray.errors import EffrayError
from effray.models import build_model
from effray.models.reference import trusting
from effray.registry import Registry

log = logging.getLogger(__name__)

FILENAME = "model.pt"
TRAIN_FORMAT = "effray.train/1"
# format -> builder(payload) -> nn.Module with the payload's weights loaded
FORMATS: Registry[Callable[[dict[str, Any]], nn.Module]] = Registry("checkpoint format")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``model.pt`` inside a checkpoint directory, or the file itself."""
    p = Path(path)
    return p / FILENAME if p.is_dir() else p


def save_payload(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``directory/model.pt`` atomically (temp file + rename), so a
    crash mid-write never leaves a half file under the real name."""
    return write_file(Path(directory) / FILENAME, lambda tmp: torch.save(payload, tmp))


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's dict with ``weights_only=True`` only; anything that needs
    arbitrary unpickling (a crafted file) or is truncated is a one-line EffrayError."""
    f = checkpoint_file(path)
    if not f.is_file():
        raise EffrayError(f"no checkpoint at {str(path)!r} (expected a checkpoint directory or its {FILENAME})")
    try:
        payload = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else type(exc).__name__)
        raise EffrayError(f"refusing to load {f}: it needs more than weights-only unpickling ({why[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, bad magic, I/O errors
        raise EffrayError(f"checkpoint {f} is unreadable ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise EffrayError(f"{f} is not an effray checkpoint (no 'format' key)")
    return payload


def load_checkpoint(
    path: str | os.PathLike, trust_code: bool | Collection[str] = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The one loader: ``(model in eval mode on CPU, payload)`` for any registered format.

    Evaluation and compression call this and never look inside a format themselves. A
    model the file names as ``pkg.module:factory`` is imported only with ``trust_code``
    (True, or the modules the user named on the command line): loading a file never runs
    code it names on its own."""
    payload = read_payload(path)
    with trusting(trust_code):
        model = FORMATS.get(payload["format"])(payload)
    return model.eval(), payload


@FORMATS.register(TRAIN_FORMAT)
def _build_trained(payload: dict[str, Any]) -> nn.Module:

    spec = payload["model_spec"]
    model = build_model(**spec)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise EffrayError(f"checkpoint weights don't fit model {spec}: {str(exc).splitlines()[0]}") from None
    return model


def first_readable(
    candidates: Sequence[str | os.PathLike], read: Callable[[str], dict[str, Any]] = read_payload
) -> tuple[str, dict[str, Any]]:
    """The first checkpoint in ``candidates`` (newest first) that loads; unreadable ones are
    skipped with a warning. A crash while a checkpoint was written, or a disk that ate
    the newest file, then costs a few epochs instead of the run. ``read`` fetches one
    (e.g. from remote storage) and returns its payload."""
    problems = []
    for c in candidates:
        try:
            return str(c), read(str(c))
        except EffrayError as exc:
            log.warning("skipping checkpoint %s: %s", c, exc)
            problems.append(str(exc))
    raise EffrayError(
        f"none of the {len(problems)} checkpoints is readable; last problem: "
        f"{problems[-1] if problems else 'no checkpoints'}"
    )


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Torch (CPU, and ``device``'s when it is a GPU) and Python RNG states, as
    weights-only-loadable types. Only the worker's own GPU: ``get_rng_state_all`` would
    create a CUDA context on every GPU of the node in every worker."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`; the GPU part only onto this worker's ``device``."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints held every GPU's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def train_payload(
    *,
    model_state: dict[str, torch.Tensor],
    model_spec: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    epoch: int,
    config: dict[str, Any],
    data: dict[str, Any],
    history: list[dict[str, Any]],
    provenance: dict[str, Any],
    elapsed_s: float,
    numerics: dict[str, bool] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Everything needed to resume (weights, optimizer, scheduler, epoch, RNG), to score
    the weights as training did (``numerics``: bf16 autocast, channels-last) and to know
    where they came from (resolved config, data checksum and normalisation,
    effray version, git SHA). Metadata goes through JSON so only plain types reach the
    pickle (a str subclass like ``torch.__version__`` would make weights-only loading fail)."""
    plain = lambda x: json.loads(json.dumps(x, default=str))  # noqa: E731
    config, data, history, provenance = plain(config), plain(data), plain(history), plain(provenance)
    return {
        "format": TRAIN_FORMAT,
        "model": model_state,
        "model_spec": dict(model_spec),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "epoch": int(epoch),
        "rng": rng_state(device),
        "config": config,
        "data": data,
        "history": history,
        "elapsed_s": float(elapsed_s),
        "numerics": {k: bool(v) for k, v in (numerics or {}).items()},
        "provenance": {"effray_version": __version__, **provenance},
    }


def data_summary(meta: dict[str, Any], model_input: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint keeps of the training data's meta.json: evaluation needs the
    normalisation and classes; provenance needs the checksum. ``model_input``
    (:func:`effray.data.augment.input_spec`): the size the model takes and the preprocessing
    that makes it of a stored image, when training changed the size (else the stored one)."""
    return {
        "checksum": meta.get("source_checksum", ""),
        "source": meta.get("source", ""),
        "classes": list(meta["classes"]),
        "num_classes": int(meta["num_classes"]),
        "image_shape": list(meta["image_shape"]),
        "mean": [float(m) for m in meta["mean"]],
        "std": [float(s) for s in meta["std"]],
        **(model_input or {}),
    }
