"""The real ``effray`` CLI run in-process, for tests (tests/ is on sys.path via its conftest)."""

from __future__ import annotations

import contextlib
import io
import json

from effray.cli import main


def cli(*args: str) -> tuple[int, dict | None, str]:
    """Run the real CLI in-process: (exit code, its JSON line, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), err.getvalue()
