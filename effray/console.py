"""What a person at the terminal sees: effray's own lines and progress bars.

Ray prints a great deal on the driver: its workers' forwarded output, autoscaler and Ray
Data warnings, and the C++ core worker's messages, which bypass Python's ``sys.stdout``.
:func:`ray_output_to` sends all of it to a log file by pointing file descriptors 1 and 2
there for the duration of a command, while :func:`say` and :func:`bar` write to the
terminal through a duplicate of the original descriptor. ``--verbose`` skips the
redirection and shows everything.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

_terminal: TextIO | None = None  # the terminal while fds 1/2 go to a log file


def terminal() -> TextIO:
    return _terminal or sys.stdout


def say(line: str) -> None:
    """One of effray's lines, on the terminal."""
    out = terminal()
    out.write(line + "\n")
    out.flush()


def bar(total: int, desc: str, unit: str) -> Any:
    """A progress bar on the terminal (tqdm; plain lines when it is not a terminal)."""
    from tqdm import tqdm

    out = terminal()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=out,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
        disable=False,
        ascii=not (hasattr(out, "isatty") and out.isatty()) or None,
    )


@contextmanager
def ray_output_to(log_file: str | os.PathLike | None) -> Iterator[Path | None]:
    """Within the block, everything written to fds 1 and 2 (by Python, C++ or child
    processes started here) is appended to ``log_file``; :func:`say` and :func:`bar` still
    reach the terminal. ``None`` changes nothing (``--verbose``)."""
    global _terminal
    if log_file is None:
        yield None
        return
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a captured stdout (pytest's capsys): keep writing to it
        real = False
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1) if real else sys.stdout
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if real and _terminal is not None:
            _terminal.close()
        _terminal = None


@contextmanager
def follow_jsonl(
    path: str | os.PathLike, on_record: Callable[[dict[str, Any]], None], every_s: float = 0.5
) -> Iterator[None]:
    """Call ``on_record`` for each line appended to ``path`` while the block runs (a Ray
    Train run's ``history.jsonl``, written by rank 0), then for any left at the end."""
    path = Path(path)
    offset = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal offset
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            try:
                on_record(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name="effray-follow", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
