"""The epoch clock: a tiny named actor holding the current epoch, so augmentation tasks
anywhere in the cluster key their randomness by the epoch the trainers are in."""

from __future__ import annotations

from typing import Any


class EpochClock:
    """Holds the current epoch so augmentation tasks anywhere in the cluster agree on it."""

    def __init__(self) -> None:
        self.epoch = 0

    def set(self, epoch: int) -> int:
        self.epoch = int(epoch)
        return self.epoch

    def get(self) -> int:
        return self.epoch


def epoch_clock(name: str) -> Any:
    """Get or create the named clock actor (idempotent; every rank may call it)."""
    import ray

    actor = ray.remote(num_cpus=0)(EpochClock)
    return actor.options(name=name, namespace="effray", get_if_exists=True, lifetime="detached").remote()


def set_epoch(name: str, epoch: int) -> None:
    """Advance the clock before iterating an epoch (every rank may call it; it's idempotent)."""
    import ray

    ray.get(epoch_clock(name).set.remote(epoch))


def kill_clock(name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace="effray"))
    except ValueError:
        pass


_clock_cache: dict[str, Any] = {}


def current_epoch(name: str) -> int:
    """The clock's epoch, read from inside a task (the actor handle cached per process)."""
    import ray

    for attempt in range(2):
        if name not in _clock_cache:
            _clock_cache[name] = ray.get_actor(name, namespace="effray")
        try:
            return int(ray.get(_clock_cache[name].get.remote()))
        except ray.exceptions.RayActorError:  # a clock of the same name was replaced
            del _clock_cache[name]
            if attempt:
                raise
    raise AssertionError("unreachable")
