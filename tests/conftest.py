"""Shared fixtures: one local Ray for the whole session, the real CIFAR-10 file, tiny datasets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_PARQUET = Path(os.environ.get("EFFRAY_CIFAR_PARQUET", ROOT.parent / "shared" / "data" / "cifar10-train.parquet"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers this often (default 2 s): each fit notices its
# workers are up and done sooner, ~3 s of the ~30 s a tiny fit costs here (every fit the
# suite runs, in-process or in a driver it starts, reads it at fit time)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a PreemptionWatcher actor per worker group: one more Python process
# polling for node *drains*, which local nodes never announce (the node-kill tests SIGKILL
# them, as a preemption without notice does); off, a trivial fit costs 0.81-0.90x the CPU
# here (bench/fit_overhead.py)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture
def one_thread():
    """Torch on one thread: on a shared 2-core machine a busy neighbour makes OpenMP
    barriers cost seconds per tiny backward (measured 1.8 s vs 14 ms with 1 thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for every test that needs it; started lazily."""
    import ray

    from effray.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)  # always a private local instance, whatever the shell says
    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_parquet() -> Path:
    if not CIFAR_PARQUET.is_file():
        pytest.fail(f"real CIFAR-10 file missing at {CIFAR_PARQUET}; set EFFRAY_CIFAR_PARQUET")
    return CIFAR_PARQUET


@pytest.fixture(scope="session")
def tiny_cifar(ray_session, cifar_parquet, tmp_path_factory) -> Path:
    """600 real CIFAR-10 images prepared into the canonical format (540 train / 60 val, no
    test split: the suite's search runs on it choose and report on val alone; the e2e runs
    of `effray run` carve the default test split)."""
    from effray.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "tiny-cifar"
    prepare(PrepareConfig(source=str(cifar_parquet), out=str(out), limit=600, val_fraction=0.1, test_fraction=0.0))
    return out


@pytest.fixture(scope="session")
def teacher(tiny_cifar, tmp_path_factory) -> Path:
    """A convnet trained in-process for a few hundred steps: a real, better-than-chance teacher
    without paying for a Ray Train fit."""
    import numpy as np
    import torch
    from helpers import save_checkpoint

    from effray.data.arrays import load_arrays
    from effray.data.images import normalize_tensor
    from effray.data.prepare import load_meta
    from effray.models import build_model
    from effray.train.checkpoint import data_summary

    meta = load_meta(tiny_cifar)
    arrays = load_arrays(tiny_cifar, "train")
    order = np.argsort(arrays["index"])  # the same rows in the same order on every run: the same teacher
    images = normalize_tensor(torch.from_numpy(arrays["image"][order]), meta["mean"], meta["std"])
    labels = torch.from_numpy(arrays["label"][order])
    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, 0.5)
    batches = [(images[i : i + 64], labels[i : i + 64]) for i in range(0, len(labels), 64)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(6):
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = tmp_path_factory.mktemp("teacher")
    save_checkpoint(out, model, data=data_summary(meta), epoch=6)
    return out


def _needs_ray(item: pytest.Item) -> bool:
    """Whether a test starts or uses Ray: the session's local Ray (directly or through a
    dataset fixture), a cluster of its own, or a driver process. An integration test that
    needs none of them (torch.distributed's own processes, say) is marked ``without_ray``
    and runs beside the Ray group."""
    if item.get_closest_marker("without_ray") is not None:
        return False
    parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
    return parts[0] in ("integration", "multinode") or "ray_session" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's ``-n 2 --dist loadgroup``: every test
    that needs Ray is one group, run in order on one worker with the session's one local
    Ray; the rest (pure torch, no Ray) run on the other worker meanwhile. ``tryfirst``:
    xdist's worker turns the mark into the ``@ray`` suffix of each node id in its own
    ``pytest_collection_modifyitems``, registered after this conftest and so called before
    it; without ``tryfirst`` the mark came too late and both workers started a Ray. Two Ray
    instances on 2 cores starve each other (startup timeouts, a dying job head); one Ray
    next to plain torch tests does not."""
    for item in items:
        if _needs_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, the worker that runs pure-torch tests yields the CPU to Ray's processes
    (niceness 10, one torch thread): the Ray group is the suite's critical path, and its
    first fixture (the clean run) took 122 s beside the ~720 pure tests against 57 s alone.
    Measured gain so far: within the suite's run-to-run spread (105 s for that fixture)."""
    if (
        os.environ.get("PYTEST_XDIST_WORKER")
        and not _needs_ray(item)
        and not getattr(pytest_runtest_setup, "done", False)
    ):
        import torch

        for task in Path("/proc/self/task").iterdir():  # niceness is per thread on Linux
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, int(task.name), 10)
        torch.set_num_threads(1)
        pytest_runtest_setup.done = True
