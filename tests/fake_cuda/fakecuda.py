"""Helpers for the fake-CUDA tests (see conftest.py)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.device("cuda", 0)


class FakeCudaGenerator(torch.Generator):
    """A generator that says it is on the GPU: a real CUDA generator needs a driver, and fake
    tensors never read its state (random ops only produce shapes)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA


def uint8_batch(n: int = 8, num_classes: int = 10, hw: int = 32) -> dict[str, torch.Tensor]:
    """What ``iter_torch_batches`` hands a GPU worker: uint8 NHWC images and int64 labels,
    already on the device (Ray's finalize step copied them)."""
    return {
        "image": torch.randint(0, 256, (n, hw, hw, 3), dtype=torch.uint8, device=CUDA),
        "label": torch.randint(0, num_classes, (n,), device=CUDA),
        "index": torch.arange(n, device=CUDA),
    }


def assert_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == "cuda", f"expected a CUDA tensor, got one on {t.device}"


def python_backward(
    root: torch.Tensor,
    gradient: torch.Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: object = None,
) -> None:
    """``Tensor.backward`` without the C++ autograd engine, for fake CUDA.

    The engine refuses fake CUDA tensors on a machine without a driver (its stream
    bookkeeping asks the driver for a context: "hasPrimaryContext expects a valid device
    index"). This walks the same graph in topological order and calls each node itself:
    the backward kernels are torch's own (custom ``autograd.Function`` backwards
    included), and, as the engine's ``validate_outputs`` does, every gradient is reduced
    to its input's shape and dtype and must be on its input's device. Tested against the
    engine on real tensors (``test_python_backward_matches_the_engine``)."""
    del retain_graph, create_graph, inputs  # the graph is walked once, first-order only
    fn = root.grad_fn
    if fn is None:
        raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    order, seen, stack = [], set(), [(fn, False)]
    while stack:  # iterative post-order DFS, reversed: each node after every node feeding it
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    grads: dict[object, list[torch.Tensor | None]] = {fn: [torch.ones_like(root) if gradient is None else gradient]}
    for node in reversed(order):
        given = grads.pop(node, None)
        if given is None:
            continue
        given = given + [None] * (len(node._input_metadata) - len(given))
        if hasattr(node, "_forward_cls"):  # a custom autograd.Function: its backward, per forward argument
            outs = node.apply(*given)
            outs = outs if isinstance(outs, tuple) else (outs,)
            # its edges are its tensor arguments; those needing a gradient are the live ones
            live = [g for g, needed in zip(outs, node.needs_input_grad) if needed]
            edges = [e for e in node.next_functions if e[0] is not None]
        else:
            outs = node(*given)
            live, edges = list(outs if isinstance(outs, tuple) else (outs,)), list(node.next_functions)
        for (nxt, index), g in zip(edges, live):
            if nxt is None or g is None:
                continue
            want = nxt._input_metadata[index]
            if g.device != want.device:
                raise RuntimeError(f"{node.name()} produced a gradient on {g.device} for an input on {want.device}")
            if tuple(g.shape) != tuple(want.shape):
                g = g.sum_to_size(want.shape)
            g = g.to(want.dtype)
            buffer = grads.setdefault(nxt, [])
            buffer.extend([None] * (index + 1 - len(buffer)))
            buffer[index] = g if buffer[index] is None else buffer[index] + g


class HostCopyError(RuntimeError):
    """A CUDA tensor was copied to the host (``.cpu()``, ``.to("cpu")``, ``.numpy()``): the
    host waits for the GPU there."""


class NoCopiesToHost(TorchDispatchMode):
    """Raises :class:`HostCopyError` on any device-to-host copy the host waits for.
    ``FakeTensorMode`` catches ``.item()``/``bool()``/data-dependent shapes but lets ``.cpu()``
    through; this closes that gap (stacked inside it, it sees every op first). A
    ``non_blocking`` copy passes: torch makes it into pinned memory and returns at once
    (the step bar's loss); reading its value is then a data-dependent op the fake mode refuses."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        src = dst = None
        if func is torch.ops.aten._to_copy.default and kwargs.get("non_blocking"):
            return func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout):
            src = args[0].device
            dst = kwargs.get("device") or (args[1] if func is torch.ops.aten.to.device else None) or src
        elif func in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default):
            dst, src = args[0].device, args[1].device
        if src is not None and torch.device(src).type == "cuda" and torch.device(dst).type == "cpu":
            raise HostCopyError(f"{func} copies a CUDA tensor to the host (a host sync)")
        return func(*args, **kwargs)


class FakeEvent:
    """A CUDA event that never completes: what a real one needs a driver for, and the reason
    a reader of a non-blocking copy must ask it before reading (the copy here holds no data)."""

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return False


class FakeCuda:
    """``with FakeCuda():`` fake CUDA tensors (``FakeTensorMode``), no device-to-host copies."""

    def __init__(self) -> None:
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.guard = NoCopiesToHost()

    def __enter__(self) -> FakeCuda:
        # cuDNN kernels have no fake implementation (grid_sample's); torch's own do, and
        # device placement is the same either way
        self.cudnn = torch.backends.cudnn.flags(enabled=False)
        self.cudnn.__enter__()
        self.fake.__enter__()
        self.guard.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.guard.__exit__(*exc)
        self.fake.__exit__(*exc)
        self.cudnn.__exit__(*exc)
