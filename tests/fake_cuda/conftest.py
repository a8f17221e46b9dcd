"""Fake CUDA on a CPU-only machine: ``FakeTensorMode`` makes ``device="cuda"`` tensors that
carry shapes, dtypes and devices but no data. Any op that mixes devices raises
``FakeTensorDeviceMismatchError``; any op that needs a value on the host (``.item()``,
``bool(t)``, ``.tolist()``, boolean-mask indexing, ``bincount``) raises a data-dependent
error. Code that runs under it is device-clean and free of host syncs.

Models are built for real on the CPU (as the workers build them) and moved with
``.to("cuda")`` inside the mode, exactly the path the strategies take.
"""

from __future__ import annotations

import pytest
import torch
from fakecuda import FakeCuda, FakeCudaGenerator, FakeEvent, python_backward


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA for ``with fake_cuda:`` (no device-to-host copies either: ``FakeCuda``).
    Build models before entering it, for real, on the CPU: real tensors become fake on first
    use inside (``allow_non_fake_inputs``),
    so ``model.to("cuda")`` there takes the same path a worker's does. The augmentation
    ops' CUDA generators become fake CUDA ones, the step bar's CUDA events fake ones
    (:class:`fakecuda.FakeEvent`), and ``Tensor.backward`` walks the graph in Python
    (:func:`fakecuda.python_backward`: the C++ engine needs a driver for CUDA tensors)."""
    from effray.data import augment
    from effray.train import stepbar

    def new_generator(device):  # CPU generators stay real: a search trial augments on its CPU
        return FakeCudaGenerator() if torch.device(device).type == "cuda" else torch.Generator(device=device)

    monkeypatch.setattr(augment, "new_generator", new_generator)
    monkeypatch.setattr(stepbar, "new_event", FakeEvent)
    monkeypatch.setattr(torch.Tensor, "backward", python_backward)
    return FakeCuda()


@pytest.fixture
def fake_process_group():
    """A 2-rank process group that moves nothing (torch's "fake" backend): collectives and
    point-to-point calls run their Python and dispatch paths on fake tensors."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(rank: int, world: int = 2) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()
