"""One exception type for every mistake a user can fix.

The CLI turns it into a single ``effray: error: ...`` line and a non-zero exit, so
messages must be one line and name the fix.
"""


class EffrayError(ValueError):
    """A user-facing error: bad input, bad config, missing data. One line, names the fix."""


def find_user_error(exc: BaseException | None) -> EffrayError | None:
    """The :class:`EffrayError` behind an exception, also when Ray wrapped it (a task,
    actor or Train worker raised it), so the CLI can print its one line."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EffrayError) and not hasattr(exc, "cause"):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None
