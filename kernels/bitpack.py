"""Bit packing of small unsigned codes into bytes, and its inverse.

``bits`` codes per element, ``8 // bits`` elements per byte, element ``j`` of a
byte at bit offset ``j * bits`` (little-endian within the byte). The packed
length for ``n`` elements is ``ceil(n * bits / 8)``; the padding codes are zero.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "packed_nbytes", "pack_bits", "unpack_bits"]

SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}; got {bits!r}")
    return 8 // bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to hold ``numel`` codes of ``bits`` bits each."""
    per_byte = _check_bits(bits)
    return -(-numel // per_byte)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes in ``[0, 2**bits)`` into a uint8 tensor."""
    per_byte = _check_bits(bits)
    if per_byte == 1:
        return codes.to(torch.uint8).contiguous()
    n = codes.numel()
    padded = packed_nbytes(n, bits) * per_byte
    if padded != n:
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, padded - n))
    lanes = codes.to(torch.uint8).view(-1, per_byte)
    out = lanes[:, 0].clone()
    for j in range(1, per_byte):
        out |= lanes[:, j] << (j * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as uint8."""
    per_byte = _check_bits(bits)
    if per_byte == 1:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel]
