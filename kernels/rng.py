"""A counter-based uniform generator: element ``i`` of stream ``seed`` is a pure function.

``uniform(seed, n)[i]`` hashes the pair ``(seed, i)`` with two rounds of the
``lowbias32`` integer mixer (C. Wellons, "Prospecting for hash functions", 2018) and
keeps the top 24 bits, so every value is a multiple of ``2**-24`` in ``[0, 1)`` and is
exactly representable in fp32. The torch twin, the CPU library and the Triton kernels
compute the same bits, so stochastic rounding is reproducible for a given seed and
step on every path. Counters are taken modulo ``2**32``.
"""

from __future__ import annotations

import torch

__all__ = ["MASK32", "GOLDEN", "mix32", "stream_keys", "uniform"]

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def _mix32_int(h: int) -> int:
    h &= MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 15
    h = (h * _M2) & MASK32
    h ^= h >> 16
    return h


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for 0 <= h < 2**32, without leaving the int64 range.
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` on an int64 tensor holding values in ``[0, 2**32)``."""
    h = h ^ (h >> 16)
    h = _mul32(h, _M1)
    h = h ^ (h >> 15)
    h = _mul32(h, _M2)
    return h ^ (h >> 16)


def stream_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of stream ``seed`` (any Python int; taken modulo ``2**64``)."""
    seed &= (1 << 64) - 1
    k0 = _mix32_int((seed & MASK32) ^ _mix32_int((seed >> 32) ^ GOLDEN))
    k1 = _mix32_int(k0 ^ 0x85EBCA6B)
    return k0, k1


def uniform(seed: int, n: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """Elements ``offset .. offset + n - 1`` of stream ``seed``, as fp32 in ``[0, 1)``."""
    k0, k1 = stream_keys(seed)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device) & MASK32
    h = mix32((_mul32(i, GOLDEN) + k0) & MASK32)
    h = mix32(h ^ k1)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
