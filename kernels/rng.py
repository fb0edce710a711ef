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

__all__ = ["MASK32", "GOLDEN", "stream_keys", "uniform"]

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


def _signed(v: int) -> int:
    """The int32 with the same 32 bits as ``0 <= v < 2**32``."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _mix32_(h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    # lowbias32 in place on int32 bits: products wrap modulo 2**32 (two's complement), and the
    # masks turn arithmetic right shifts into logical ones.
    for shift, mask, mult in ((16, 0xFFFF, _M1), (15, 0x1FFFF, _M2), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(h, shift, out=scratch)
        h.bitwise_xor_(scratch.bitwise_and_(mask))
        if mult is not None:
            h.mul_(_signed(mult))
    return h


def stream_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of stream ``seed`` (any Python int; taken modulo ``2**64``)."""
    seed &= (1 << 64) - 1
    k0 = _mix32_int((seed & MASK32) ^ _mix32_int((seed >> 32) ^ GOLDEN))
    k1 = _mix32_int(k0 ^ 0x85EBCA6B)
    return k0, k1


def uniform(seed: int, n: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """Elements ``offset .. offset + n - 1`` of stream ``seed``, as fp32 in ``[0, 1)``."""
    k0, k1 = stream_keys(seed)
    h = (torch.arange(offset, offset + n, dtype=torch.int64, device=device) & MASK32).to(torch.int32)
    scratch = torch.empty_like(h)
    _mix32_(h.mul_(_signed(GOLDEN)).add_(_signed(k0)), scratch)
    _mix32_(h.bitwise_xor_(_signed(k1)), scratch)
    return h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))
