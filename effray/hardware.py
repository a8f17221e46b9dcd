"""What the machine computes natively: printed beside every CPU time, and asked before
choosing bf16 autocast. The same CPU code runs several times faster on an AVX512-BF16 +
VNNI machine than on an AVX2 one, so a time without these facts says little."""

from __future__ import annotations

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions/matmuls in hardware: CUDA GPUs from
    Ampere on, x86 CPUs with AVX512-BF16 or AMX (emulated bf16 is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def vnni_native() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI): int8 dot products in one
    instruction, what makes oneDNN's int8 kernels beat fp32."""
    return bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def cpu_summary() -> str:
    """The line every CPU time is printed beside: the kernels torch picked for this CPU,
    native bf16 and VNNI."""
    return (
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, bf16 native "
        f"{'yes' if bf16_native(torch.device('cpu')) else 'no'}, VNNI {'yes' if vnni_native() else 'no'}"
    )
