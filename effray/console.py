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
from dataclasses import dataclass
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


def bar(total: int, desc: str, unit: str, leave: bool = True) -> Any:
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
        leave=leave,
        disable=False,
        ascii=not (hasattr(out, "isatty") and out.isatty()) or None,
    )


# ------------------------------------------------------------------ rank 0's per-step bar

STEP_BAR_DELAY_S = 3.0  # an epoch shorter than this shows no per-step bar (its epoch line is enough)
STEP_BAR_EVERY_S = 0.5  # at most this often a new state (a Ray Train worker's goes through an actor)


@dataclass(frozen=True)
class StepState:
    """One refresh of the per-step bar of a training epoch (rank 0's, in whatever process
    it trains): steps done of ``total``, images/s over all ranks, rank 0's running loss
    (None until the device has handed one back), and whether the epoch ended."""

    desc: str
    step: int
    total: int
    images_per_s: float
    loss: float | None
    done: bool = False


class StepBars:
    """Draws :class:`StepState` s on the terminal: one bar per epoch (a new ``desc``), gone
    from the screen when the epoch ends (its epoch line or bar says the rest)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.desc = ""

    def show(self, state: StepState) -> None:
        if state.done or (self.bar is not None and state.desc != self.desc):
            self.close()
        if state.done:
            return
        if self.bar is None:
            self.bar, self.desc = bar(state.total, state.desc, "step", leave=False), state.desc
        loss = "loss ..." if state.loss is None else f"loss {state.loss:.4f}"
        self.bar.n = min(state.step, state.total)
        self.bar.set_postfix_str(f"{state.images_per_s:,.0f} img/s, {loss}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.desc = None, ""


class BarRelay:
    """The actor a Ray Train run's rank 0 posts its :class:`StepState` s to, from any node:
    the driver, whose terminal it is, draws them (a worker's own output goes to Ray's log)."""

    def __init__(self) -> None:
        self.state: StepState | None = None
        self.version = 0

    def put(self, state: StepState) -> None:
        self.state, self.version = state, self.version + 1

    def get(self, seen: int) -> tuple[int, StepState | None]:
        """The newest state, if newer than version ``seen``."""
        return (self.version, self.state) if self.version != seen else (seen, None)


@contextmanager
def _polling(poll: Callable[[], None], every_s: float, name: str) -> Iterator[None]:
    """Call ``poll`` every ``every_s`` seconds on a daemon thread while the block runs; the
    thread is joined before the block's exit goes on."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def relayed_step_bars(name: str, every_s: float = 0.25) -> Iterator[None]:
    """Within the block, draw here (:class:`StepBars`) what rank 0 posts to the relay actor
    ``name`` (:func:`relay_to`); the actor is created here and goes at the end."""
    import ray

    relay = ray.remote(num_cpus=0)(BarRelay).options(name=name, namespace="effray").remote()
    bars, seen = StepBars(), 0

    def poll() -> None:
        nonlocal seen
        try:
            seen, state = ray.get(relay.get.remote(seen), timeout=10)
        except Exception:  # noqa: BLE001 - a bar must never fail the run it shows
            return
        if state is not None:
            bars.show(state)

    try:
        with _polling(poll, every_s, "effray-step-bar"):
            yield
    finally:
        bars.close()
        ray.kill(relay)


def relay_to(name: str) -> Callable[[StepState], None]:
    """Rank 0's side of :func:`relayed_step_bars`: post a state and go on (no wait)."""
    import ray

    relay = ray.get_actor(name, namespace="effray")
    return lambda state: relay.put.remote(state) and None


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

    try:
        with _polling(poll, every_s, "effray-follow"):
            yield
    finally:
        poll()
