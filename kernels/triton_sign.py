"""Triton kernels for scaled sign with error feedback (see :mod:`lightning_compress_kernels.sign` for the meaning).

The dispatcher (:mod:`lightning_compress_kernels._dispatch`) has :mod:`lightning_compress_kernels.sign` call these for CUDA tensors,
or for CPU tensors under ``TRITON_INTERPRET=1``, and only for byte-aligned layouts
(``block % 8 == 0`` or one block).

Tiling, bit packing and payload rows are those of :mod:`lightning_compress_kernels.triton_blocks`: a program
holds ``G`` whole short blocks, or walks one long block in chunks, with a first pass for the
sums and a second one that recomputes ``v`` and writes the bits and the residual. Either way
the whole op is one kernel launch.

* :func:`sign_ef` and :func:`sign_server_step` share one kernel: the server step decodes
  and sums the ranks' payloads onto the server error in registers (in payload order, as the
  twin does) and then encodes the sum, with ``server_error_out`` as the residual.
* :func:`sign_decode_add` reads ``out`` once, adds every payload in registers, writes once;
  its programs cover ``G`` blocks or one chunk of a long block each (no per-element division
  to find an element's block).

Numerics: ``-0.0`` encodes as ``+`` (``v >= 0``), NaN as ``-``; a block holding inf/NaN gets a
non-finite scale and residual, other blocks are unaffected. Scales divide with IEEE rounding
(``div_rn``) and launches disable fp contraction, so decoding is bit-equal to the twin and
scales and sums differ from it only by summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import num_blocks
from .triton_blocks import bit_at, decode_grid, decode_tile, geometry, pack_store, payload_rows, warps

__all__ = ["sign_ef", "sign_decode_add", "sign_server_step"]


# ----- encode (and the server step) ------------------------------------------------------
@triton.jit
def _load_v(
    x_ptr, xscale, res_ptr, sc_in_ptr, pk_in_ptr, sc_stride, pk_stride, R,
    rows, row_ok, offs, mask,
    SCALED: tl.constexpr, HAS_RES: tl.constexpr, DECODE: tl.constexpr,
):
    """``v = xscale * x (+ residual) (+ sum_r decode_r)`` on a tile, zero where masked."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SCALED:
        v = v * xscale
    if HAS_RES:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0)
    if DECODE:
        sc_row = sc_in_ptr  # payload rows are walked by pointer increments: 64-bit offsets
        pk_row = pk_in_ptr
        for _ in range(R):
            s = tl.load(sc_row + rows, mask=row_ok, other=0.0)[:, None]
            bit = bit_at(pk_row, offs, mask)
            v = v + tl.where(bit != 0, s, -s)
            sc_row += sc_stride
            pk_row += pk_stride
    return tl.where(mask, v, 0.0)


@triton.jit
def _emit(v, mask, offs, scale, packed_ptr, res_out_ptr, row_start, c0, block, n,
          WRITE_RES: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr):
    positive = (v >= 0) & mask
    pack_store(positive.to(tl.int32), packed_ptr, row_start, c0, block, n, G, CHUNK)
    if WRITE_RES:
        s = scale[:, None]
        tl.store(res_out_ptr + offs, v - tl.where(positive, s, -s), mask=mask)


@triton.jit
def _sign_encode_kernel(
    x_ptr, xscale, res_ptr, sc_in_ptr, pk_in_ptr, sc_stride, pk_stride, R,
    scales_ptr, packed_ptr, sq_ptr, res_out_ptr,
    n, nb, block,
    G: tl.constexpr, CHUNK: tl.constexpr, ONE_PASS: tl.constexpr,
    SCALED: tl.constexpr, HAS_RES: tl.constexpr, DECODE: tl.constexpr, WRITE_RES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * G + tl.arange(0, G)  # block indices
    row_ok = rows < nb
    row_start = rows * block
    cols = tl.arange(0, CHUNK)
    if ONE_PASS:
        offs = row_start[:, None] + cols[None, :]
        mask = (cols[None, :] < block) & (offs < n)
        v = _load_v(x_ptr, xscale, res_ptr, sc_in_ptr, pk_in_ptr, sc_stride, pk_stride, R,
                    rows, row_ok, offs, mask, SCALED, HAS_RES, DECODE)
        total = tl.sum(tl.abs(v), axis=1)
        sq = tl.sum(v * v, axis=1)
    else:
        acc = tl.zeros((G, CHUNK), dtype=tl.float32)
        acc_sq = tl.zeros((G, CHUNK), dtype=tl.float32)
        for c0 in range(0, block, CHUNK):
            offs = row_start[:, None] + c0 + cols[None, :]
            mask = (c0 + cols[None, :] < block) & (offs < n)
            v = _load_v(x_ptr, xscale, res_ptr, sc_in_ptr, pk_in_ptr, sc_stride, pk_stride, R,
                        rows, row_ok, offs, mask, SCALED, HAS_RES, DECODE)
            acc += tl.abs(v)
            acc_sq += v * v
        total = tl.sum(acc, axis=1)
        sq = tl.sum(acc_sq, axis=1)
    length = tl.maximum(tl.minimum(n - row_start, block), 1).to(tl.float32)
    scale = tl.math.div_rn(total, length)
    tl.store(scales_ptr + rows, scale, mask=row_ok)
    tl.store(sq_ptr + rows, sq, mask=row_ok)
    if ONE_PASS:
        _emit(v, mask, offs, scale, packed_ptr, res_out_ptr, row_start, 0, block, n, WRITE_RES, G, CHUNK)
    else:
        for c0 in range(0, block, CHUNK):
            offs = row_start[:, None] + c0 + cols[None, :]
            mask = (c0 + cols[None, :] < block) & (offs < n)
            v = _load_v(x_ptr, xscale, res_ptr, sc_in_ptr, pk_in_ptr, sc_stride, pk_stride, R,
                        rows, row_ok, offs, mask, SCALED, HAS_RES, DECODE)
            _emit(v, mask, offs, scale, packed_ptr, res_out_ptr, row_start, c0, block, n, WRITE_RES, G, CHUNK)


def _encode(x, residual, payloads, block, residual_out, scale=1.0):
    n = x.numel()
    device = x.device
    scales = torch.empty(num_blocks(n, block), dtype=torch.float32, device=device)
    sq = torch.empty_like(scales)
    packed = torch.empty(-(-n // 8), dtype=torch.uint8, device=device)
    if n == 0:
        return scales, packed, sq
    block_k, nb, group, chunk, one_pass = geometry(n, block)
    if payloads is None:
        sc_in, sc_stride, pk_in, pk_stride, r = x, 0, x, 0, 0
    else:
        sc_in, sc_stride, pk_in, pk_stride, r = payloads
    grid = (triton.cdiv(nb, group),)
    _sign_encode_kernel[grid](
        x, float(scale), residual if residual is not None else x, sc_in, pk_in, sc_stride, pk_stride, r,
        scales, packed, sq, residual_out if residual_out is not None else x,
        n, nb, block_k,
        G=group, CHUNK=chunk, ONE_PASS=one_pass, SCALED=scale != 1.0,
        HAS_RES=residual is not None, DECODE=payloads is not None, WRITE_RES=residual_out is not None,
        num_warps=warps(group * chunk), enable_fp_fusion=False,
    )
    return scales, packed, sq


def sign_ef(x: torch.Tensor, residual, block: int, residual_out, scale: float = 1.0):
    """``(scales, packed, sq)`` of ``v = scale * x + residual``; fills ``residual_out`` if given."""
    return _encode(x, residual, None, block, residual_out, scale)


def _payloads(scales, packed, n: int, block: int, device):
    nb = num_blocks(n, block)
    if len(scales) != len(packed):
        raise ValueError(f"{len(scales)} scale tensors but {len(packed)} bit tensors")
    sc, sc_stride = payload_rows(scales, nb, torch.float32, device, "scales")
    pk, pk_stride = payload_rows(packed, -(-n // 8), torch.uint8, device, "packed")
    return sc, sc_stride, pk, pk_stride, len(scales)


def sign_server_step(scales, packed, server_error: torch.Tensor, block: int, server_error_out: torch.Tensor):
    """Encode ``w = server_error + sum_r decode_r`` with ``server_error_out = w - C(w)``, fused."""
    n = server_error.numel()
    payloads = _payloads(scales, packed, n, block, server_error.device) if len(scales) and n else None
    return _encode(server_error, None, payloads, block, server_error_out)


# ----- decode-accumulate -----------------------------------------------------------------
@triton.jit
def _sign_decode_add_kernel(
    sc_ptr, pk_ptr, sc_stride, pk_stride, R, out_ptr, n, nb, block, chunks,
    G: tl.constexpr, CHUNK: tl.constexpr, ASSIGN: tl.constexpr,
):
    rows, row_ok, offs, mask = decode_tile(tl.program_id(0), chunks, n, nb, block, G, CHUNK)
    if ASSIGN:  # out's old contents are not read: the sum starts from 0
        acc = tl.zeros((G, CHUNK), dtype=tl.float32)
    else:
        acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    for _ in range(R):
        s = tl.load(sc_ptr + rows, mask=row_ok, other=0.0)[:, None]
        bit = bit_at(pk_ptr, offs, mask)
        acc = acc + tl.where(bit != 0, s, -s)
        sc_ptr += sc_stride  # the next payload's row; pointer arithmetic is 64-bit
        pk_ptr += pk_stride
    tl.store(out_ptr + offs, acc, mask=mask)


def sign_decode_add(scales, packed, out: torch.Tensor, block: int, assign: bool = False) -> torch.Tensor:
    """``out (+)= sum_r scales[r][b] * (+1 if bit else -1)`` in one pass over ``out``."""
    n = out.numel()
    if n == 0 or not len(scales):
        return out.zero_() if assign else out
    sc, sc_stride, pk, pk_stride, r = _payloads(scales, packed, n, block, out.device)
    grid, block_k, nb, chunks, group, chunk = decode_grid(n, block)
    _sign_decode_add_kernel[grid](
        sc, pk, sc_stride, pk_stride, r, out, n, nb, block_k, chunks,
        G=group, CHUNK=chunk, ASSIGN=bool(assign), num_warps=warps(group * chunk), enable_fp_fusion=False,
    )
    return out
