"""Triton kernels for the top-k fast path and sparse scatter-accumulate (see :mod:`lightning_compress_kernels.topk`).

* :func:`add`: ``v_out = x + residual``, elementwise.
* :func:`select_at_least`: the indices ``i`` with ``|v_i| >= threshold`` in ascending order,
  and ``sum v**2``, in two launches: a count pass (per-program counts and partial sums of
  squares), an exclusive prefix sum of the counts on the device, and a compaction pass where
  each program writes its hits at its offset plus their rank within the program
  (``tl.cumsum`` of the hit mask). A NaN never passes (``|NaN| >= t`` is false).
* :func:`scatter_add`: ``out[idx_r] += values_r`` payload by payload, one launch each, with
  plain load-add-store (indices within a payload are distinct), so the result is
  deterministic and equal to ``index_add_`` applied in order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["add", "select_at_least", "scatter_add"]

_TILE = 1024


@triton.jit
def _add_kernel(x_ptr, r_ptr, out_ptr, n, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    r = tl.load(r_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + r, mask=mask)


def add(x: torch.Tensor, residual: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
    """``v_out = x + residual`` (``v_out`` may be ``residual`` or ``x``)."""
    n = x.numel()
    if n:
        _add_kernel[(triton.cdiv(n, _TILE),)](x, residual, v_out, n, TILE=_TILE, num_warps=4)
    return v_out


@triton.jit
def _count_kernel(v_ptr, counts_ptr, sq_ptr, n, threshold, TILE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    hit = (tl.abs(v) >= threshold) & mask
    tl.store(counts_ptr + pid, tl.sum(hit.to(tl.int32), axis=0))
    tl.store(sq_ptr + pid, tl.sum(v * v, axis=0))


@triton.jit
def _compact_kernel(v_ptr, starts_ptr, out_ptr, n, threshold, TILE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    hit = (tl.abs(v) >= threshold) & mask
    rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1
    start = tl.load(starts_ptr + pid)
    tl.store(out_ptr + start + rank, offs, mask=hit)


def select_at_least(v: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices with |v_i| >= threshold ascending as int64, sum of v**2 as a 0-d fp32 tensor)``."""
    n = v.numel()
    device = v.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.zeros((), dtype=torch.float32, device=device)
    programs = triton.cdiv(n, _TILE)
    counts = torch.empty(programs, dtype=torch.int32, device=device)
    partial = torch.empty(programs, dtype=torch.float32, device=device)
    threshold = float(threshold)
    _count_kernel[(programs,)](v, counts, partial, n, threshold, TILE=_TILE, num_warps=4)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    starts = ends - counts
    total = int(ends[-1])  # the candidates' count sizes the output: one device-to-host read
    candidates = torch.empty(total, dtype=torch.int64, device=device)
    if total:
        _compact_kernel[(programs,)](v, starts, candidates, n, threshold, TILE=_TILE, num_warps=4)
    return candidates, partial.sum()


@triton.jit
def _scatter_add_kernel(val_ptr, idx_ptr, out_ptr, m, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < m
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    val = tl.load(val_ptr + offs, mask=mask, other=0.0)
    cur = tl.load(out_ptr + idx, mask=mask, other=0.0)
    tl.store(out_ptr + idx, cur + val, mask=mask)


def scatter_add(values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out[indices[r]] += values[r]`` for every payload in order; returns ``out``."""
    if len(values) != len(indices):
        raise ValueError(f"{len(values)} value tensors but {len(indices)} index tensors")
    for val, idx in zip(values, indices):
        if val.numel() != idx.numel():
            raise ValueError(f"a payload has {val.numel()} values but {idx.numel()} indices")
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be int32 or int64; got {idx.dtype}")
        m = idx.numel()
        if m == 0:
            continue
        val = val.to(device=out.device, dtype=torch.float32).contiguous()
        idx = idx.to(out.device).contiguous()
        _scatter_add_kernel[(triton.cdiv(m, _TILE),)](val, idx, out, m, TILE=_TILE, num_warps=4)
    return out
