"""Write-then-rename helpers: an output appears whole under its real name, or not at all.

Every stage writes its results through these, so a crash, a full disk or `ray job stop`
mid-write never leaves a half-written file or directory where a later stage (or a
resumed run) would trust it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (same filesystem, so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{kind}-{uuid.uuid4().hex[:8]}{p.suffix}")


def write_file(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; the temp file goes on failure."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Pretty JSON, atomically; non-JSON values (numpy scalars, paths) become strings."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_file(path, lambda tmp: tmp.write_text(text))


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished directory ``src`` to ``dst``. An existing ``dst`` (``--overwrite``)
    is renamed aside first and deleted only after, so ``dst`` is never half-written."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = temp_sibling(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
