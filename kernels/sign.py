"""Scaled sign with error feedback: encode, decode-accumulate, and the two-pass server step.

Meaning (the torch twins below are the reference):

* ``sign_ef(x, residual, block, scale)``: ``v = scale * x + residual`` (``residual`` may be
  ``None``; ``scale`` 1 reads ``x`` as it is, the product is rounded before the sum); per
  block ``b`` of ``block`` elements (the last may be shorter) ``scale_b = sum|v_b| / len_b``
  and ``sq_b = sum v_b**2``; bit ``i`` is ``v_i >= 0`` (so ``-0.0`` encodes as ``+``), packed
  8 per byte little-endian (:mod:`lightning_compress_kernels.bitpack`); if ``residual_out`` is given it receives
  ``v - scale_b * (+1 if bit else -1)``, the error that feedback carries to the next step.
* ``sign_decode_add(scales, packed, out, block, assign)``: ``out += sum_r scale_r[b] * sign_r``
  (with ``assign``, ``out = 0 + sum_r ...``: its old contents are not read).
* ``sign_ef_multi`` / ``sign_decode_multi``: the same for every tensor of a list at once, with
  each tensor's payload at a byte offset of one wire buffer (layout: fp32 scales, then bits),
  and each block's statistics as :func:`block_stats` defines them.
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

from ._blocks import as_blocks, block_lengths, byte_aligned, num_blocks
from ._dispatch import implementation
from .bitpack import pack_bits, unpack_bits
from .velocity import Velocity, fused_velocity_ok, velocity_many

__all__ = ["SignCode", "sign_ef", "sign_decode_add", "sign_server_step", "sign_payload_nbytes", "sign_ef_multi",
           "sign_decode_multi"]


class SignCode(NamedTuple):
    scales: torch.Tensor  # fp32, one per block
    packed: torch.Tensor  # uint8, ceil(n / 8)
    sq: torch.Tensor  # fp32, sum of v**2 per block


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"`{name}` must be a contiguous 1-D fp32 tensor; got {x.dtype} {tuple(x.shape)}")


def _implementation(x: torch.Tensor, block: int):
    """The module with the single-tensor kernels for ``x`` (None: the twin); they take byte-aligned blocks."""
    return implementation(x, triton="triton_sign", fits=byte_aligned(x.numel(), block))


# ----- torch twins ---------------------------------------------------------------------
def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else x * scale


def sign_ef_torch(x, residual, block, residual_out=None, scale=1.0) -> SignCode:
    v = _scaled(x, scale)
    v = v if residual is None else v + residual
    n = v.numel()
    blocks = as_blocks(v, block)
    scales = blocks.abs().sum(dim=1) / block_lengths(n, block, v.device)
    sq = (blocks * blocks).sum(dim=1)
    positive = v >= 0
    if residual_out is not None:
        per_elem = scales.repeat_interleave(block)[:n] if n else scales
        residual_out.copy_(v - torch.where(positive, per_elem, -per_elem))
    return SignCode(scales, pack_bits(positive.to(torch.uint8), 1), sq)


def sign_decode_add_torch(scales, packed, out, block, assign=False) -> torch.Tensor:
    n = out.numel()
    if assign:
        out.zero_()
    for s, p in zip(scales, packed):
        signs = unpack_bits(p, 1, n).to(torch.float32).mul_(2).sub_(1)
        out.add_(as_blocks(signs, block).mul_(s.unsqueeze(1)).reshape(-1)[:n])
    return out


def sign_server_step_torch(scales, packed, server_error, block, server_error_out) -> SignCode:
    total = server_error.clone()
    sign_decode_add_torch(scales, packed, total, block)
    return sign_ef_torch(total, None, block, server_error_out)


# ----- the ops: each runs the kernel that kernels._dispatch chooses --------------------
def sign_ef(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    block: int,
    residual_out: torch.Tensor | None = None,
    scale: float = 1.0,
) -> SignCode:
    """Encode ``v = scale * x + residual`` as per-block scales and sign bits; see the module doc."""
    _check(x, "x")
    for t, name in ((residual, "residual"), (residual_out, "residual_out")):
        if t is not None:
            _check(t, name)
            if t.numel() != x.numel():
                raise ValueError(f"`{name}` has {t.numel()} elements, `x` has {x.numel()}")
    if block < 1:
        raise ValueError(f"`block` must be >= 1; got {block}")
    impl = _implementation(x, block)
    if impl is None:
        return sign_ef_torch(x, residual, block, residual_out, scale)
    return SignCode(*impl.sign_ef(x, residual, block, residual_out, scale))


def sign_decode_add(
    scales: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor],
    out: torch.Tensor,
    *,
    block: int,
    assign: bool = False,
) -> torch.Tensor:
    """``out += sum_r decode(scales[r], packed[r])`` in place (``assign``: ``out = ...``); returns ``out``."""
    _check(out, "out")
    if len(scales) != len(packed):
        raise ValueError(f"{len(scales)} scale tensors but {len(packed)} bit tensors")
    if not scales:
        return out.zero_() if assign else out
    impl = _implementation(out, block)
    if impl is None:
        return sign_decode_add_torch(scales, packed, out, block, assign)
    return impl.sign_decode_add(scales, packed, out, block, assign)


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
    impl = _implementation(server_error, block)
    if impl is None:
        return sign_server_step_torch(scales, packed, server_error, block, server_error_out)
    return SignCode(*impl.sign_server_step(scales, packed, server_error, block, server_error_out))


# ----- many tensors at once ---------------------------------------------------------------
_FP32_MAX = torch.finfo(torch.float32).max


def sign_payload_nbytes(numel: int, block: int) -> int:
    """Bytes of one tensor's payload: an fp32 scale per block, then the packed sign bits."""
    return 4 * num_blocks(numel, block) + -(-numel // 8)


def _payload_parts(wire: torch.Tensor, offset: int, numel: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = num_blocks(numel, block)
    scales = wire[offset : offset + 4 * nb].view(torch.float32)
    return scales, wire[offset + 4 * nb : offset + 4 * nb + -(-numel // 8)]


def _aligned(tensors: Sequence[torch.Tensor], blocks: Sequence[int]) -> bool:
    return all(byte_aligned(t.numel(), b) for t, b in zip(tensors, blocks))


def sign_ef_multi(
    xs: Sequence[torch.Tensor],
    residuals: Sequence[torch.Tensor | None],
    residuals_out: Sequence[torch.Tensor | None],
    wire: torch.Tensor,
    offsets: Sequence[int],
    *,
    blocks: Sequence[int],
    scale: float = 1.0,
    velocity: Velocity | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sign_ef` of every tensor, each payload written into ``wire`` (uint8) at its offset.

    With ``velocity`` (see :class:`lightning_compress_kernels.velocity.Velocity`; ``scale`` must be 1) each tensor's
    input is ``s_t + residual_t``, computed in the same pass on the CPU path, and the new
    velocities are written: the same bits as :func:`lightning_compress_kernels.velocity.velocity` followed by
    this op on ``s``.

    ``offsets`` must be multiples of 4 (the scales are fp32). Returns ``(sq, err)`` per block
    of every tensor in order (fp32), see :func:`block_stats`: NaN marks a block that is not
    finite. The CPU path does every tensor in one call; the others loop over tensors.
    """
    if not xs:
        empty = torch.empty(0, device=wire.device)
        return empty, empty
    if velocity is not None and scale != 1.0:
        raise ValueError(f"with a velocity the input scale is the velocity's `xs`; got scale={scale}")
    # One C call for the bucket; elsewhere a loop of the single-tensor op, each dispatched on its own.
    cpu = implementation(
        xs[0],
        cpu="cpu_multi",
        fits=lambda: _aligned(xs, blocks) and (velocity is None or fused_velocity_ok(xs, velocity)),
    )
    if cpu is not None:
        return cpu.sign_ef_multi(xs, residuals, residuals_out, wire, offsets, blocks, scale, velocity)
    if velocity is not None:
        xs = velocity_many(xs, velocity)
    sqs, errs = [], []
    for x, e, r, off, block in zip(xs, residuals, residuals_out, offsets, blocks):
        code = sign_ef(x, e, block=block, residual_out=r, scale=scale)
        scales, packed = _payload_parts(wire, off, x.numel(), block)
        scales.copy_(code.scales)
        packed.copy_(code.packed)
        sq, err = block_stats(code, x.numel(), block)
        sqs.append(sq)
        errs.append(err)
    return torch.cat(sqs), torch.cat(errs)


def block_stats(code: SignCode, numel: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sq, err)`` per block as the hook reads them (fp32).

    A block whose scale is not finite (it holds inf/NaN, or ``sum |v|`` overflowed) gets NaN in
    both; otherwise ``sq = sum v**2`` saturated at the largest fp32 (a square may overflow where
    the values do not) and ``err = max(sq - len * scale**2, 0)``, the block's ``||v - C(v)||**2``.
    """
    lengths = block_lengths(numel, block, code.scales.device)
    sq = code.sq.clamp(max=_FP32_MAX)
    err = (sq - lengths * code.scales * code.scales).clamp_(min=0)
    ok = torch.isfinite(code.scales)
    nan = torch.full_like(sq, float("nan"))
    return torch.where(ok, sq, nan), torch.where(ok, err, nan)


def sign_decode_multi(
    wires: Sequence[torch.Tensor],
    offsets: Sequence[int],
    outs: Sequence[torch.Tensor],
    *,
    blocks: Sequence[int],
    assign: bool = True,
) -> Sequence[torch.Tensor]:
    """``outs[t] (+)= sum_r decode(wires[r] at offsets[t])`` for every tensor; returns ``outs``."""
    if not outs:
        return outs
    cpu = implementation(outs[0], cpu="cpu_multi", fits=lambda: _aligned(outs, blocks))
    if cpu is not None:
        return cpu.sign_decode_multi(wires, offsets, outs, blocks, assign)
    for out, off, block in zip(outs, offsets, blocks):
        parts = [_payload_parts(w, off, out.numel(), block) for w in wires]
        sign_decode_add([s for s, _ in parts], [p for _, p in parts], out, block=block, assign=assign)
    return outs
