"""Triton kernels for QSGD encode and decode-accumulate (see :mod:`lightning_compress_kernels.qsgd` for the meaning).

The dispatcher (:mod:`lightning_compress_kernels._dispatch`) calls these for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, and
only for byte-aligned layouts (``block % 8 == 0`` and ``block * bits % 8 == 0``, or one block).

* :func:`qsgd_encode`: one kernel; a program holds ``G`` whole blocks (``G * CHUNK``
  elements, the tiling of :mod:`lightning_compress_kernels.triton_blocks`) and computes the peak, the unit norm, the
  stochastic levels and both packed outputs in registers. A block longer than the longest
  tile gets a program of its own that walks it in three passes (peak, norm, codes).
* :func:`qsgd_decode_add`: one kernel on the same tiling (a program per ``G`` blocks, or per
  chunk of a long block, so the norm is loaded per block and no element needs a division to
  find its block) that reads ``out`` once, adds every payload in registers in payload order,
  and writes once.

The stochastic rounding draws ``u_i`` from the counter RNG of :mod:`lightning_compress_kernels.rng` with the same
32-bit arithmetic (:func:`_uniform`), so the draws are bit-equal to ``rng.uniform``. Divisions
and square roots use IEEE rounding (``div_rn``, ``sqrt_rn``) and launches disable fp
contraction, so levels match the twin except where summation order moves ``s*unit/unorm + u``
across an integer, and decoding is bit-equal to the twin on CPU (on CUDA, torch divides by the
scalar ``s`` as a multiplication by ``1/s``, so the twin may differ in the last bit there).

inf/NaN: a block holding inf or NaN gets a NaN norm (the unit of an inf is inf/inf); its
codes are unspecified but confined to its own bits; other blocks are unaffected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import num_blocks
from .rng import stream_keys
from .triton_blocks import bit_at, decode_grid, decode_tile, geometry, pack_store, payload_rows, warps

__all__ = ["qsgd_encode", "qsgd_decode_add"]


# ----- the counter RNG of kernels.rng, in uint32 arithmetic ------------------------------
@triton.jit
def _mix32(h):
    """``lowbias32`` on uint32 (wrapping multiplies)."""
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x7FEB352D, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full((), 0x846CA68B, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _uniform(index, k0, k1):
    """``rng.uniform`` at int64 element indices ``index`` for the stream keys ``k0, k1``."""
    i = (index & 0xFFFFFFFF).to(tl.uint32)
    h = i * tl.full((), 0x9E3779B9, tl.uint32) + k0.to(tl.uint32)
    h = _mix32(h)
    h = _mix32(h ^ k1.to(tl.uint32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


# Keys equal to 1 must not become constexprs (Triton specializes integer arguments equal to 1).
@triton.jit(do_not_specialize=["k0", "k1"])
def _uniform_kernel(out_ptr, n, offset, k0, k1, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    tl.store(out_ptr + offs, _uniform(offs + offset, k0, k1), mask=offs < n)


def uniform(seed: int, n: int, device="cpu", offset: int = 0) -> torch.Tensor:
    """:func:`lightning_compress_kernels.rng.uniform` computed by the Triton RNG (for tests and checks)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        k0, k1 = stream_keys(seed)
        _uniform_kernel[(triton.cdiv(n, 1024),)](out, n, offset, k0, k1, TILE=1024)
    return out


# ----- encode ----------------------------------------------------------------------------
@triton.jit
def _pack_codes(codes, out_ptr, row_start, c0, block, n,
                BITS: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr):
    """Store a ``(G, CHUNK)`` tile of int32 codes (< 2**BITS, zero where masked), ``8 // BITS``
    per byte, element ``j`` of a byte at bit ``j * BITS``; ``row_start + c0`` is byte-aligned."""
    PER: tl.constexpr = 8 // BITS
    lanes = tl.reshape(codes, (G, CHUNK // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    byte = tl.sum(lanes << shifts[None, None, :], axis=2)
    bcol = tl.arange(0, CHUNK // PER) * PER
    first = row_start[:, None] + c0 + bcol[None, :]  # element index of each byte's first code
    ok = (c0 + bcol[None, :] < block) & (first < n)
    tl.store(out_ptr + first // PER, byte.to(tl.uint8), mask=ok)


@triton.jit
def _emit(x, mask, offs, peak_safe, unorm_safe, signs_ptr, codes_ptr, row_start, c0, block, n, k0, k1,
          LEVELS: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr):
    unit = tl.math.div_rn(tl.abs(x), peak_safe[:, None])
    scaled = tl.math.div_rn(unit, unorm_safe[:, None]) * LEVELS
    level = tl.floor(scaled + _uniform(offs, k0, k1))
    level = tl.minimum(tl.maximum(level, 0.0), LEVELS * 1.0)
    level = tl.where(level == level, level, 0.0)  # NaN (a non-finite block): code 0
    code = tl.where(mask, level.to(tl.int32) & LEVELS, 0)
    pack_store(((x >= 0) & mask).to(tl.int32), signs_ptr, row_start, c0, block, n, G, CHUNK)
    _pack_codes(code, codes_ptr, row_start, c0, block, n, BITS, G, CHUNK)


@triton.jit(do_not_specialize=["k0", "k1"])
def _qsgd_encode_kernel(
    x_ptr, norms_ptr, signs_ptr, codes_ptr, n, nb, block, k0, k1,
    LEVELS: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, CHUNK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * G + tl.arange(0, G)
    row_ok = rows < nb
    row_start = rows * block
    cols = tl.arange(0, CHUNK)
    if ONE_PASS:
        offs = row_start[:, None] + cols[None, :]
        mask = (cols[None, :] < block) & (offs < n)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        peak = tl.max(tl.abs(x), axis=1)
        peak_safe = tl.where(peak > 0, peak, 1.0)
        unit = tl.math.div_rn(tl.abs(x), peak_safe[:, None])
        unorm = tl.sqrt_rn(tl.sum(unit * unit, axis=1))
    else:
        acc = tl.zeros((G, CHUNK), dtype=tl.float32)
        for c0 in range(0, block, CHUNK):
            offs = row_start[:, None] + c0 + cols[None, :]
            mask = (c0 + cols[None, :] < block) & (offs < n)
            acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=mask, other=0.0)))
        peak = tl.max(acc, axis=1)
        peak_safe = tl.where(peak > 0, peak, 1.0)
        acc = tl.zeros((G, CHUNK), dtype=tl.float32)
        for c0 in range(0, block, CHUNK):
            offs = row_start[:, None] + c0 + cols[None, :]
            mask = (c0 + cols[None, :] < block) & (offs < n)
            unit = tl.math.div_rn(tl.abs(tl.load(x_ptr + offs, mask=mask, other=0.0)), peak_safe[:, None])
            acc += unit * unit
        unorm = tl.sqrt_rn(tl.sum(acc, axis=1))
    tl.store(norms_ptr + rows, unorm * peak, mask=row_ok)
    unorm_safe = tl.where(unorm > 0, unorm, 1.0)
    if ONE_PASS:
        _emit(x, mask, offs, peak_safe, unorm_safe, signs_ptr, codes_ptr, row_start, 0, block, n, k0, k1,
              LEVELS, BITS, G, CHUNK)
    else:
        for c0 in range(0, block, CHUNK):
            offs = row_start[:, None] + c0 + cols[None, :]
            mask = (c0 + cols[None, :] < block) & (offs < n)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            _emit(x, mask, offs, peak_safe, unorm_safe, signs_ptr, codes_ptr, row_start, c0, block, n, k0, k1,
                  LEVELS, BITS, G, CHUNK)


def _levels(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"qsgd kernels take `bits` in (1, 2, 4, 8); got {bits!r}")
    return (1 << bits) - 1


def qsgd_encode(x: torch.Tensor, bits: int, block: int, seed: int):
    """``(norms, signs, codes)`` of ``x``; see :mod:`lightning_compress_kernels.qsgd`."""
    levels = _levels(bits)
    n = x.numel()
    device = x.device
    norms = torch.empty(num_blocks(n, block), dtype=torch.float32, device=device)
    signs = torch.empty(-(-n // 8), dtype=torch.uint8, device=device)
    codes = torch.empty(-(-n * bits // 8), dtype=torch.uint8, device=device)
    if n == 0:
        return norms, signs, codes
    block_k, nb, group, chunk, one_pass = geometry(n, block)
    k0, k1 = stream_keys(seed)
    _qsgd_encode_kernel[(triton.cdiv(nb, group),)](
        x, norms, signs, codes, n, nb, block_k, k0, k1,
        LEVELS=levels, BITS=bits, G=group, CHUNK=chunk, ONE_PASS=one_pass,
        num_warps=warps(group * chunk), enable_fp_fusion=False,
    )
    return norms, signs, codes


# ----- decode-accumulate -----------------------------------------------------------------
@triton.jit
def _qsgd_decode_add_kernel(
    nm_ptr, sg_ptr, cd_ptr, nm_stride, sg_stride, cd_stride, R, out_ptr, n, nb, block, chunks,
    LEVELS: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    rows, row_ok, offs, mask = decode_tile(tl.program_id(0), chunks, n, nb, block, G, CHUNK)
    shift = ((offs % PER) * BITS).to(tl.int32)
    acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    for _ in range(R):
        norm = tl.load(nm_ptr + rows, mask=row_ok, other=0.0)[:, None]
        sign = tl.where(bit_at(sg_ptr, offs, mask) != 0, 1.0, -1.0)
        byte = tl.load(cd_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
        level = ((byte >> shift) & LEVELS).to(tl.float32)
        acc = acc + tl.math.div_rn(level * sign, LEVELS * 1.0) * norm
        nm_ptr += nm_stride  # the next payload's row; pointer arithmetic is 64-bit
        sg_ptr += sg_stride
        cd_ptr += cd_stride
    tl.store(out_ptr + offs, acc, mask=mask)


def qsgd_decode_add(norms, signs, codes, out: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``out += sum_r norms[r][b] * sign * level / levels`` in one pass over ``out``."""
    levels = _levels(bits)
    n = out.numel()
    if not (len(norms) == len(signs) == len(codes)):
        raise ValueError("`norms`, `signs` and `codes` must have one entry per payload")
    if n == 0 or not len(norms):
        return out
    device = out.device
    nm, nm_stride = payload_rows(norms, num_blocks(n, block), torch.float32, device, "norms")
    sg, sg_stride = payload_rows(signs, -(-n // 8), torch.uint8, device, "signs")
    cd, cd_stride = payload_rows(codes, -(-n * bits // 8), torch.uint8, device, "codes")
    grid, block_k, nb, chunks, group, chunk = decode_grid(n, block)
    _qsgd_decode_add_kernel[grid](
        nm, sg, cd, nm_stride, sg_stride, cd_stride, len(norms), out, n, nb, block_k, chunks,
        LEVELS=levels, BITS=bits, G=group, CHUNK=chunk, num_warps=warps(group * chunk), enable_fp_fusion=False,
    )
    return out
