"""Scaled sign with error feedback: encode, decode-accumulate, and the two-pass server step.

Meaning (the torch twins below are the reference):

* ``sign_ef(x, residual, block)``: ``v = x + residual`` (``residual`` may be ``None``); per
  block ``b`` of ``block`` elements (the last may be shorter) ``scale_b = sum|v_b| / len_b``
  and ``sq_b = sum v_b**2``; bit ``i`` is ``v_i >= 0`` (so ``-0.0`` encodes as ``+``), packed
  8 per byte little-endian (:mod:`kernels.bitpack`); if ``residual_out`` is given it receives
  ``v - scale_b * (+1 if bit else -1)``, the error that feedback carries to the next step.
* ``sign_decode_add(scales, packed, out, block)``: ``out += sum_r scale_r[b] * sign_r``.
* ``sign_server_step(scales, packed, server_error, block, server_error_out)``: aggregate the
  ranks' payloads of one shard, add the server error, re-encode, and write the new server
  error, i.e. ``sign_ef(server_error + sum_r decode_r, residual_out=server_error_out)``.

inf/NaN policy: a block holding inf or NaN gets a non-finite scale (and non-finite
residual entries); its bits are those of ``v >= 0`` (NaN encodes as ``-``). Decoding such a
block gives non-finite values. The DDP hook checks gradients for inf/NaN before it encodes
and never keeps memory written from them.

Paths: fp32 tensors only. The CPU library and Triton handle layouts where every block
starts on a byte (``block % 8 == 0`` or a single block); other layouts use the twin.
Scales are sums, so paths agree to fp32 rounding (relative 1e-5); bits agree exactly.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from kernels._blocks import as_blocks, block_lengths, byte_aligned
from kernels._dispatch import path_for
from kernels.bitpack import pack_bits, unpack_bits

__all__ = ["SignCode", "sign_ef", "sign_decode_add", "sign_server_step"]


class SignCode(NamedTuple):
    scales: torch.Tensor  # fp32, one per block
    packed: torch.Tensor  # uint8, ceil(n / 8)
    sq: torch.Tensor  # fp32, sum of v**2 per block


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"`{name}` must be a contiguous 1-D fp32 tensor; got {x.dtype} {tuple(x.shape)}")


def _path(x: torch.Tensor, block: int) -> str:
    path = path_for(x)
    return path if byte_aligned(x.numel(), block) else "torch"


# ----- torch twins ---------------------------------------------------------------------
def sign_ef_torch(x, residual, block, residual_out=None) -> SignCode:
    v = x if residual is None else x + residual
    n = v.numel()
    blocks = as_blocks(v, block)
    scales = blocks.abs().sum(dim=1) / block_lengths(n, block, v.device)
    sq = (blocks * blocks).sum(dim=1)
    positive = v >= 0
    if residual_out is not None:
        per_elem = scales.repeat_interleave(block)[:n] if n else scales
        residual_out.copy_(v - torch.where(positive, per_elem, -per_elem))
    return SignCode(scales, pack_bits(positive.to(torch.uint8), 1), sq)


def sign_decode_add_torch(scales, packed, out, block) -> torch.Tensor:
    n = out.numel()
    for s, p in zip(scales, packed):
        signs = unpack_bits(p, 1, n).to(torch.float32).mul_(2).sub_(1)
        out.add_(as_blocks(signs, block).mul_(s.unsqueeze(1)).reshape(-1)[:n])
    return out


def sign_server_step_torch(scales, packed, server_error, block, server_error_out) -> SignCode:
    total = server_error.clone()
    sign_decode_add_torch(scales, packed, total, block)
    return sign_ef_torch(total, None, block, server_error_out)


# ----- dispatch ------------------------------------------------------------------------
def sign_ef(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    block: int,
    residual_out: torch.Tensor | None = None,
) -> SignCode:
    """Encode ``v = x + residual`` as per-block scales and sign bits; see the module doc."""
    _check(x, "x")
    for t, name in ((residual, "residual"), (residual_out, "residual_out")):
        if t is not None:
            _check(t, name)
            if t.numel() != x.numel():
                raise ValueError(f"`{name}` has {t.numel()} elements, `x` has {x.numel()}")
    if block < 1:
        raise ValueError(f"`block` must be >= 1; got {block}")
    path = _path(x, block)
    if path == "cpu":
        from kernels import cpu

        return SignCode(*cpu.sign_ef(x, residual, block, residual_out))
    if path == "triton":
        from kernels import triton_sign

        return SignCode(*triton_sign.sign_ef(x, residual, block, residual_out))
    return sign_ef_torch(x, residual, block, residual_out)


def sign_decode_add(
    scales: Sequence[torch.Tensor], packed: Sequence[torch.Tensor], out: torch.Tensor, *, block: int
) -> torch.Tensor:
    """``out += sum_r decode(scales[r], packed[r])`` in place; returns ``out``."""
    _check(out, "out")
    if len(scales) != len(packed):
        raise ValueError(f"{len(scales)} scale tensors but {len(packed)} bit tensors")
    if not scales:
        return out
    path = _path(out, block)
    if path == "cpu":
        from kernels import cpu

        return cpu.sign_decode_add(scales, packed, out, block)
    if path == "triton":
        from kernels import triton_sign

        return triton_sign.sign_decode_add(scales, packed, out, block)
    return sign_decode_add_torch(scales, packed, out, block)


def sign_server_step(
    scales: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor],
    server_error: torch.Tensor,
    *,
    block: int,
    server_error_out: torch.Tensor,
) -> SignCode:
    """Sum the ranks' payloads of one shard, add the server error, re-encode; see the module doc."""
    _check(server_error, "server_error")
    _check(server_error_out, "server_error_out")
    path = _path(server_error, block)
    if path == "cpu":
        from kernels import cpu

        return SignCode(*cpu.sign_server_step(scales, packed, server_error, block, server_error_out))
    if path == "triton":
        from kernels import triton_sign

        return SignCode(*triton_sign.sign_server_step(scales, packed, server_error, block, server_error_out))
    return sign_server_step_torch(scales, packed, server_error, block, server_error_out)
