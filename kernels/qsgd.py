"""QSGD quantize + pack with counter-based stochastic rounding, and dequantize-accumulate.

Meaning (the torch twins below are the reference), for ``s = 2**bits - 1`` levels and blocks
of ``block`` elements (the last may be shorter):

* ``peak_b = max|x_b|``; ``unit = |x| / peak_b`` (``peak_b = 0`` divides by 1);
  ``unorm_b = ||unit_b||_2``; the block norm is ``norm_b = unorm_b * peak_b``, computed this
  way so that squares neither overflow nor underflow in fp32.
* level ``l_i = min(floor(s * unit_i / unorm_b + u_i), s)`` (``unorm_b = 0`` divides by 1)
  with ``u_i = kernels.rng.uniform(seed, n)[i]``: the same bits on every path.
* sign bit ``x_i >= 0``, packed 8 per byte; levels packed ``bits`` bits each.
* decode: ``x_i ~ norm_b * (+1 if sign else -1) * l_i / s``.

``bits`` is 1, 2, 4 or 8. inf/NaN policy: a block holding inf or NaN gets a non-finite norm,
its codes are unspecified, and decoding it gives non-finite values (the DDP hook never
encodes such gradients). Norms agree across paths to fp32 rounding (relative 1e-5); a level
can differ by one where ``s * unit / unorm + u`` lands within rounding of an integer.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ._blocks import as_blocks, byte_aligned
from ._dispatch import implementation
from .bitpack import pack_bits, unpack_bits
from .rng import uniform
from .sign import _check

__all__ = ["QSGDCode", "QSGD_BITS", "qsgd_encode", "qsgd_decode_add"]

QSGD_BITS = (1, 2, 4, 8)


class QSGDCode(NamedTuple):
    norms: torch.Tensor  # fp32, one per block
    signs: torch.Tensor  # uint8, ceil(n / 8)
    codes: torch.Tensor  # uint8, ceil(n * bits / 8)


def _check_bits(bits: int) -> int:
    if bits not in QSGD_BITS:
        raise ValueError(f"qsgd kernels take `bits` in {QSGD_BITS}; got {bits!r}")
    return (1 << bits) - 1


def qsgd_encode_torch(x, bits, block, seed) -> QSGDCode:
    levels = _check_bits(bits)
    n = x.numel()
    magnitude = as_blocks(x.abs(), block)
    peak = magnitude.amax(dim=1, keepdim=True)
    unit = magnitude / torch.where(peak > 0, peak, torch.ones_like(peak))
    unorm = torch.sqrt((unit * unit).sum(dim=1, keepdim=True))
    norms = (unorm * peak).reshape(-1)
    safe = torch.where(unorm > 0, unorm, torch.ones_like(unorm))
    scaled = (unit / safe * levels).reshape(-1)[:n]
    level = torch.floor(scaled + uniform(seed, n, x.device)).clamp_(0, levels).to(torch.uint8)
    return QSGDCode(norms, pack_bits((x >= 0).to(torch.uint8), 1), pack_bits(level, bits))


def qsgd_decode_add_torch(norms, signs, codes, out, bits, block) -> torch.Tensor:
    levels = _check_bits(bits)
    n = out.numel()
    for nb, sg, cd in zip(norms, signs, codes):
        sign = unpack_bits(sg, 1, n).to(torch.float32).mul_(2).sub_(1)
        values = unpack_bits(cd, bits, n).to(torch.float32).mul_(sign).div_(levels)
        out.add_(as_blocks(values, block).mul_(nb.unsqueeze(1)).reshape(-1)[:n])
    return out


def _implementation(x: torch.Tensor, bits: int, block: int):
    """The module with the kernels for ``x`` (None: the twin); blocks of signs and of codes must start on a byte."""
    fits = byte_aligned(x.numel(), block) and byte_aligned(x.numel(), block, bits)
    return implementation(x, triton="triton_qsgd", fits=fits)


def qsgd_encode(x: torch.Tensor, *, bits: int, block: int, seed: int) -> QSGDCode:
    """Quantize ``x`` to ``bits``-bit levels per block norm; see the module doc."""
    _check(x, "x")
    _check_bits(bits)
    impl = _implementation(x, bits, block)
    if impl is None:
        return qsgd_encode_torch(x, bits, block, seed)
    return QSGDCode(*impl.qsgd_encode(x, bits, block, seed))


def qsgd_decode_add(
    norms: Sequence[torch.Tensor],
    signs: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    out: torch.Tensor,
    *,
    bits: int,
    block: int,
) -> torch.Tensor:
    """``out += sum_r decode(norms[r], signs[r], codes[r])`` in place; returns ``out``."""
    _check(out, "out")
    _check_bits(bits)
    if not (len(norms) == len(signs) == len(codes)):
        raise ValueError("`norms`, `signs` and `codes` must have one entry per payload")
    if not norms:
        return out
    impl = _implementation(out, bits, block)
    if impl is None:
        return qsgd_decode_add_torch(norms, signs, codes, out, bits, block)
    return impl.qsgd_decode_add(norms, signs, codes, out, bits, block)
