"""What structured pruning may cut in a model it didn't build: a graph from torchvision, timm or
a user's factory, where effray's own nets are plain ``nn.Sequential`` stacks.

Torch-Pruning's dependency graph finds the channel groups of any traceable model; these
helpers decide which groups are safe to cut (not one that runs through a raw parameter,
such as a ViT's position embedding), which attention modules lose whole heads, and check
that the pruned graph still runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effray.compress.layers import classifier
from effray.errors import EffrayError

PRUNABLE = (nn.Conv2d, nn.Linear)


def referenced(model: nn.Module) -> bool:
    return ":" in str((getattr(model, "spec", None) or {}).get("name", ""))


def layer_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{qkv linear: heads}`` of every timm-style attention (a fused ``qkv`` and ``num_heads``)."""
    return {
        m.qkv: int(m.num_heads)
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    }


def set_heads(model: nn.Module, pruner: Any) -> None:
    """After heads went: each attention's ``num_heads`` (and ``attn_dim``), which its forward reads."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in getattr(pruner, "num_heads", {}):
            m.num_heads = int(pruner.num_heads[qkv])
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * int(m.head_dim)


def unsafe_layers(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, str]:
    """The convs/linears whose channel group Torch-Pruning can't cut safely in this graph:
    groups that run through a raw ``nn.Parameter`` (a position embedding or class token on a
    transformer's residual stream) or a ``MultiheadAttention``. Each is reported, not cut."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    protect = [classifier(model)]
    out: dict[nn.Module, str] = {}
    for group in graph.get_all_groups(ignored_layers=protect, root_module_types=PRUNABLE):
        members = [dep.target.module for dep, _ in group]
        why = next(
            (
                "shares its channels with a raw parameter (e.g. a position embedding)"
                if isinstance(t, nn.Parameter)
                else "feeds a MultiheadAttention"
                for t in members
                if isinstance(t, (nn.Parameter, nn.MultiheadAttention))
            ),
            "",
        )
        if why:
            for dep, _ in group:
                t = dep.target.module
                if isinstance(t, PRUNABLE) and graph.is_out_channel_pruning_fn(dep.handler):
                    out.setdefault(t, why)
    return out


def check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """A pruned model that no longer runs fails here, in one line, not in the next epoch."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - whatever the graph's own forward raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise EffrayError(
            f"structured pruning left {type(model).__name__} unable to run ({type(exc).__name__}: {first}); "
            "use --prune-kind unstructured for this model"
        ) from None
