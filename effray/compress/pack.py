"""Bit-level storage: k-bit codes packed into bytes, sparse where that is smaller.

Each tensor becomes one byte string in the artifact's blob, encoded the cheapest way:

* ``qdense``:  n codes of k bits, offset to unsigned, packed LSB-first: ceil(n*k/8) bytes.
* ``qsparse``: a 1-bit non-zero bitmap + k-bit codes of the non-zeros: ceil(n/8) +
  ceil(nnz*k/8) bytes; chosen when smaller (above ~1/k sparsity).
* ``f32`` / ``f32sparse``: float tensors raw, or bitmap + non-zero values (pruned but
  unquantized layers).
* ``f16``: step sizes and biases of quantized layers (their forward already uses the
  fp16-rounded values, so this is exact).
* ``raw``: anything else (BN statistics, int buffers) byte for byte.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # values per packing pass: bounds the n*k temporary (a multiple of 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits -> uint8 tensor of ceil(n*bits/8) bytes."""
    v = values.flatten().to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values outside [0, 2^{bits})")
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = 1 << torch.arange(8, dtype=torch.int64)
    out = []
    for i in range(0, v.numel(), CHUNK):
        b = ((v[i : i + CHUNK, None] >> shifts) & 1).flatten()
        pad = (-b.numel()) % 8
        if pad:
            b = torch.cat([b, b.new_zeros(pad)])
        out.append((b.view(-1, 8) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as int64."""
    shifts = torch.arange(8, dtype=torch.int64)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    out = []
    step = CHUNK * bits // 8  # bytes holding exactly CHUNK values
    for i in range(0, data.numel(), step):
        b = ((data[i : i + step].to(torch.int64)[:, None] >> shifts) & 1).flatten()
        n = b.numel() // bits
        out.append((b[: n * bits].view(n, bits) * weights).sum(1))
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.int64))[:count]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def encode_codes(codes: torch.Tensor, bits: int) -> tuple[str, torch.Tensor]:
    """Symmetric k-bit codes (|c| <= 2^(k-1)-1) -> (encoding, bytes), dense or sparse."""
    flat = codes.flatten().to(torch.int64)
    offset = 2 ** (bits - 1) - 1
    nz = flat != 0
    nnz = int(nz.sum())
    if math.ceil(flat.numel() / 8) + math.ceil(nnz * bits / 8) < math.ceil(flat.numel() * bits / 8):
        return "qsparse", torch.cat([pack_bits(nz, 1), pack_bits(flat[nz] + offset, bits)])
    return "qdense", pack_bits(flat + offset, bits)


def decode_codes(enc: str, data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    offset = 2 ** (bits - 1) - 1
    if enc == "qdense":
        return unpack_bits(data, bits, count) - offset
    mask_bytes = math.ceil(count / 8)
    nz = unpack_bits(data[:mask_bytes], 1, count).bool()
    out = torch.zeros(count, dtype=torch.int64)
    out[nz] = unpack_bits(data[mask_bytes:], bits, int(nz.sum())) - offset
    return out


def encode_float(t: torch.Tensor, half: bool = False) -> tuple[str, torch.Tensor]:
    """Float tensor -> (encoding, bytes): fp16 when asked, else fp32 raw or bitmap + non-zeros."""
    flat = t.detach().flatten().float()
    if half:
        return "f16", _bytes(flat.half())
    nz = flat != 0
    nnz = int(nz.sum())
    if math.ceil(flat.numel() / 8) + 4 * nnz < 4 * flat.numel():
        return "f32sparse", torch.cat([pack_bits(nz, 1), _bytes(flat[nz])])
    return "f32", _bytes(flat)


def decode_float(enc: str, data: torch.Tensor, count: int) -> torch.Tensor:
    if enc == "f16":
        return data.clone().view(torch.float16).float()
    if enc == "f32":
        return data.clone().view(torch.float32)
    mask_bytes = math.ceil(count / 8)
    nz = unpack_bits(data[:mask_bytes], 1, count).bool()
    out = torch.zeros(count, dtype=torch.float32)
    out[nz] = data[mask_bytes:].clone().view(torch.float32)
    return out


def encode_raw(t: torch.Tensor) -> tuple[str, torch.Tensor]:
    return "raw", _bytes(t.detach())


def decode_raw(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return data.clone().view(dtype) if data.numel() else torch.zeros(0, dtype=dtype)


def theory_bytes(n_weights: int, bits: int, channels: int, nnz: int | None = None) -> int:
    """What a k-bit layer should cost: n*k/8 bytes of codes (or bitmap + non-zero codes) +
    an fp16 step size per output channel. The size test holds the packer to this."""
    dense = math.ceil(n_weights * bits / 8)
    if nnz is not None:
        dense = min(dense, math.ceil(n_weights / 8) + math.ceil(nnz * bits / 8))
    return dense + 2 * channels
