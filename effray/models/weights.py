"""Starting weights: ``--weights FILE`` (a ``.pt``/``.pth`` state dict read weights-only, or
``.safetensors``) and ``--pretrained`` (torchvision's or timm's published weights).

Loading says what happened, key by key: a classifier of another size (ImageNet's 1000
classes into a 10-class model) is re-initialised and reported; keys the file lacks
elsewhere are an error, since a half-loaded backbone trains as if from scratch while
looking pretrained; keys the file has and the model doesn't are reported.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray.errors import EffrayError
from effray.models.reference import LIBRARIES, build_reference, is_reference, parse_reference

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")  # where training scripts keep the weights
_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning-style wrappers


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, without running any code it names."""
    p = Path(path)
    if not p.is_file():
        raise EffrayError(f"--weights {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise EffrayError(f"--weights {path} is not a readable safetensors file ({str(exc)[:160]})") from None
    if p.suffix not in SUFFIXES:
        raise EffrayError(f"--weights {path}: expected a state dict file ({', '.join(SUFFIXES)})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EffrayError(
            f"--weights {path} holds more than tensors (a pickled model?); save model.state_dict() instead"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, bad magic
        raise EffrayError(f"--weights {path} is unreadable ({type(exc).__name__}: {str(exc)[:160]})") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EffrayError(f"--weights {path} is not a state dict (a mapping of names to tensors)")
    return dict(obj)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _strip(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Keys with a wrapper's prefix removed, when that makes them the model's."""
    for prefix in _PREFIXES:
        if not any(k in wanted for k in state) and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Load ``state`` into ``model`` (in place): returns ``{"loaded", "reinitialised",
    "unexpected"}`` key lists. The classifier's keys are re-initialised when the file's are
    of another size or absent; any other missing or misshapen key fails in one line."""
    own = model.state_dict()
    state = _strip(state, set(own))
    head = _head_prefix(model)
    reinit, missing, misshapen = [], [], []
    usable: dict[str, torch.Tensor] = {}
    for key, t in own.items():
        theirs = state.get(key)
        if theirs is not None and tuple(theirs.shape) == tuple(t.shape):
            usable[key] = theirs
        elif key.startswith(head) and head:
            reinit.append(key)
        elif key.endswith("num_batches_tracked"):
            continue  # older files lack BN's step counter; it only matters for momentum=None
        elif theirs is None:
            missing.append(key)
        else:
            misshapen.append(f"{key} {list(theirs.shape)} vs {list(t.shape)}")
    if missing or misshapen:
        what = (f"{len(missing)} missing, e.g. {', '.join(missing[:3])}" if missing else "") + (
            ("; " if missing else "") + f"{len(misshapen)} of another shape, e.g. {'; '.join(misshapen[:2])}"
            if misshapen
            else ""
        )
        raise EffrayError(
            f"--weights {source} doesn't fit the model ({what}); pass weights saved from this architecture"
        )
    model.load_state_dict(usable, strict=False)
    unexpected = sorted(set(state) - set(own))
    return {"loaded": len(usable), "reinitialised": reinit, "unexpected": unexpected}


def _head_prefix(model: nn.Module) -> str:
    """``"fc."``: the state-dict prefix of the classifier (the last ``Linear``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f"{names[-1]}." if names else ""


def describe(report: dict[str, Any], source: str) -> str:
    """One line for the terminal: what loading ``source`` did."""
    line = f"weights from {source}: {report['loaded']} tensors loaded"
    if report["reinitialised"]:
        line += f"; classifier re-initialised for these classes ({', '.join(report['reinitialised'])})"
    if report["unexpected"]:
        shown = ", ".join(report["unexpected"][:4]) + (", ..." if len(report["unexpected"]) > 4 else "")
        line += f"; {len(report['unexpected'])} keys in the file unused ({shown})"
    return line


def pretrained_state(text: str) -> dict[str, torch.Tensor]:
    """The published weights of a ``torchvision:`` or ``timm:`` model (downloaded, or from the
    local cache); a machine that can't download fails in one line naming ``--weights``."""
    if not is_reference(text) or parse_reference(text).kind not in LIBRARIES:
        raise EffrayError(f"--pretrained needs a torchvision: or timm: --model, not {text!r}; pass --weights FILE")
    ref = parse_reference(text)
    try:
        if ref.kind == "torchvision":
            import torchvision

            return dict(torchvision.models.get_model_weights(ref.name).DEFAULT.get_state_dict(progress=False))
        import timm

        return dict(timm.create_model(ref.name, pretrained=True, **ref.kwargs).state_dict())
    except Exception as exc:  # noqa: BLE001 - URLError, HF hub errors, no weights published
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise EffrayError(
            f"--pretrained: {ref.text}'s published weights can't be fetched here ({type(exc).__name__}: {first}); "
            "download them where there is network and pass --weights FILE"
        ) from None


def initial_weights(model: nn.Module, weights: str = "", pretrained: str = "") -> dict[str, Any] | None:
    """Load ``--weights`` (a path) or ``--pretrained`` (the model's reference) into ``model``:
    the load report with where the weights came from, or None when neither is asked."""
    if weights:
        report = load_weights(model, read_state_dict(weights), weights)
        return {"source": os.path.abspath(weights), "checksum": file_digest(weights), **report}
    if pretrained:
        return {"source": f"pretrained:{pretrained}", **load_weights(model, pretrained_state(pretrained), pretrained)}
    return None


def fresh(text: str, num_classes: int, in_channels: int) -> nn.Module:
    """A referenced model built to check weights against (the driver's look before workers start)."""
    return build_reference(parse_reference(text), num_classes, in_channels)
