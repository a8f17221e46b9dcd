"""Name -> object registries (augment ops, models, pruners, quantizers, ...).

An unknown name is an error that lists the valid ones, so a typo in a config or a
CLI flag is fixed from the message alone.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from effray.errors import EffrayError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders; ``register`` is a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise EffrayError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class _CallablePackage(types.ModuleType):
    """A package that is also its stage's Python API: ``effray.train(...)``."""

    __api__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__api__(*args, **kwargs)


def callable_package(name: str, api: Callable[..., Any]) -> None:
    """Make the package ``name`` (``effray.train``) callable as ``api``: the Python API reads
    as the command (``effray.train(model=net, data=...)``) while ``effray.train.loop`` and the
    rest stay the package's modules."""
    module = sys.modules[name]
    module.__class__ = _CallablePackage
    module.__api__ = api
