"""torchvision's CIFAR download format: python pickles of uint8 rows, read safely.

The pickles are loaded by an unpickler that builds numpy arrays and builtins only, so a
tampered download is refused instead of running its code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from effray.errors import EffrayError


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and builtins: a CIFAR batch needs nothing else, and a
    pickle that asks for more is refused instead of running its code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one torchvision CIFAR batch file safely; keys decoded to str."""
    try:
        with open(path, "rb") as fh:
            raw = CifarUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001
        raise EffrayError(f"cannot read CIFAR batch {path}: {exc}; re-download the dataset") from None
    if not isinstance(raw, dict):
        raise EffrayError(f"CIFAR batch {path} is not a dict; is this torchvision's CIFAR format?")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def cifar_layout(kind: str, path: Path) -> tuple[Path, list[tuple[str, str]], str, str]:
    """(folder of the batch files, [(file, fixed split)], meta file, its class-names key)."""
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    base = path / sub if (path / sub).is_dir() else path
    if kind == "cifar10":
        files = [(f"data_batch_{i}", "") for i in range(1, 6)] + [("test_batch", "test")]
        return base, files, "batches.meta", "label_names"
    return base, [("train", ""), ("test", "test")], "meta", "fine_label_names"
