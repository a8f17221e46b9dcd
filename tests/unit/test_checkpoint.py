"""Checkpoints: round trip, weights-only loading everywhere, crafted pickles refused, fallback."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from effray.errors import EffrayError
from effray.models import build_model
from effray.train.checkpoint import (
    TRAIN_FORMAT,
    first_readable,
    load_checkpoint,
    read_payload,
    save_payload,
    train_payload,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = {
    "checksum": "sha256:abc",
    "source": "test",
    "classes": [str(i) for i in range(10)],
    "num_classes": 10,
    "image_shape": [32, 32, 3],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
}


def _save(directory: Path, epoch: int = 1, name: str = "convnet") -> torch.nn.Module:
    torch.manual_seed(epoch)
    model = build_model(name, num_classes=10, width=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    save_payload(
        directory,
        train_payload(
            model_state=model.state_dict(),
            model_spec=model.spec,
            optimizer=opt.state_dict(),
            scheduler={},
            epoch=epoch,
            config={"model": name, "epochs": 3},
            data=DATA,
            history=[{"epoch": epoch}],
            provenance={"git_sha": None, "torch": torch.__version__},
            elapsed_s=1.5,
        ),
    )
    return model.eval()


def test_roundtrip_rebuilds_the_same_model_from_dir_or_file(tmp_path):
    model = _save(tmp_path / "ckpt", epoch=3)
    x = torch.randn(2, 3, 32, 32)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.pt"):
        loaded, payload = load_checkpoint(path)
        assert payload["format"] == TRAIN_FORMAT and payload["epoch"] == 3
        assert payload["model_spec"] == {"name": "convnet", "num_classes": 10, "in_channels": 3, "width": 0.5}
        assert payload["data"]["checksum"] == "sha256:abc" and payload["provenance"]["effray_version"]
        assert type(payload["provenance"]["torch"]) is str  # plain types only (weights-only safe)
        assert {"torch", "python"} <= set(payload["rng"]) and payload["optimizer"]["state"]
        assert not loaded.training
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class _Evil:
    """Unpickling this touches a file: stands in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker, f = tmp_path / "pwned", tmp_path / "model.pt"
    payload = {"format": TRAIN_FORMAT, "model": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, f)
    else:
        f.write_bytes(pickle.dumps(payload))
    with pytest.raises(EffrayError, match="refusing to load|unreadable"):
        load_checkpoint(f)
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            fn = node.func
            if (
                isinstance(fn, ast.Attribute)
                and fn.attr == "load"
                and isinstance(fn.value, ast.Name)
                and fn.value.id == "torch"
            ):
                calls.append(node)
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            assert "load" not in {a.name for a in node.names}, (
                f"{path}: import torch.load by name; call torch.load(...)"
            )
    return calls


def test_every_torch_load_in_the_project_is_weights_only():
    files = [p for d in ("effray", "bench", "jobs") for p in (ROOT / d).rglob("*.py")]
    found = 0
    for f in files:
        for call in _torch_load_calls(f):
            found += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert ok, f"{f.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
    assert found >= 1  # the scan sees the checkpoint loader itself


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    dirs = [tmp_path / f"epoch-{e}" for e in (1, 2, 3)]
    for e, d in enumerate(dirs, start=1):
        _save(d, epoch=e)
    newest = dirs[-1] / "model.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    path, payload = first_readable(list(reversed(dirs)))
    assert path == str(dirs[1]) and payload["epoch"] == 2
    for d in dirs[:2]:
        (d / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(EffrayError, match="none of the 3 checkpoints is readable"):
        first_readable(list(reversed(dirs)))


def test_unknown_format_and_mismatched_weights_are_one_line_errors(tmp_path):
    torch.save({"format": "someone.else/9"}, tmp_path / "other.pt")
    with pytest.raises(EffrayError, match="unknown checkpoint format 'someone.else/9'; valid: .*effray.train/1"):
        load_checkpoint(tmp_path / "other.pt")
    _save(tmp_path / "ckpt")
    payload = read_payload(tmp_path / "ckpt")
    payload["model_spec"]["width"] = 1.0  # the weights are a width-0.5 convnet
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(EffrayError, match="don't fit model"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(EffrayError, match="no checkpoint at"):
        read_payload(tmp_path / "nowhere")
