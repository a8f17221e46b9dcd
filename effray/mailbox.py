"""The mailbox: what a run's rank 0 hands its driver beyond Ray Train's metrics (Train V2
keeps only the metrics reported with a checkpoint), from whatever node rank 0 is on.

An actor's process imports the module its class lives in; this one imports nothing but
Ray, so the mailbox starts as a bare Ray worker rather than one that loads torch and the
training stack first.
"""

from __future__ import annotations

from typing import Any


class Mailbox:
    """What a run's rank 0 hands its driver beyond Ray Train's metrics (Train V2 keeps only
    the metrics reported with a checkpoint), from whatever node rank 0 is on: an actor
    the driver owns, found by name from the workers."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def open_mailbox(name: str) -> Any:
    """The driver's mailbox ``name`` (created here, owned by the caller: it goes with it)."""
    import ray

    return ray.remote(num_cpus=0)(Mailbox).options(name=name, namespace="effray").remote()


def post(name: str, value: Any) -> None:
    """From a worker: leave ``value`` in the driver's mailbox ``name``."""
    import ray

    ray.get(ray.get_actor(name, namespace="effray").put.remote(value))
