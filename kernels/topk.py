"""Top-k sparsification with error feedback, and scatter-accumulate of sparse payloads.

Meaning (the torch twins are the reference):

* ``topk_ef(x, residual, k)``: ``v = x + residual`` (``residual`` may be ``None``); the
  ``k`` entries of largest ``|v|``, as fp32 values and int32 indices in ascending index
  order, and ``sq = sum v**2``; if ``residual_out`` is given it receives ``v`` with the kept
  entries set to zero (``v - C(v)``, the error that feedback carries on).
* ``scatter_add(values, indices, out)``: ``out[indices[r]] += values[r]`` for every payload.

The fast paths find the same set without sorting all of ``|v|``: a threshold is read off
a random sample (positions from :func:`kernels.rng.uniform`) with a margin of four binomial
standard deviations, one fused pass writes ``v`` and compacts the indices of the entries at
or above it (a little more than ``k``), and the exact top-``k`` of those is kept. In the
rare draw where fewer than ``k`` pass, the exact top-``k`` of all of ``|v|`` is taken. So the
result is always an exact top-``k`` set; paths can differ only in which of several entries
of equal magnitude at the ``k``-th place is kept.

inf/NaN policy: inf counts as the largest magnitude; whether a NaN is kept is unspecified
(the DDP hook never encodes non-finite gradients).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from kernels._dispatch import path_for
from kernels.rng import uniform
from kernels.sign import _check

__all__ = ["TopKCode", "topk_ef", "scatter_add", "sample_threshold"]


class TopKCode(NamedTuple):
    values: torch.Tensor  # fp32 (k,)
    indices: torch.Tensor  # int32 (k,), ascending
    sq: torch.Tensor  # fp32 scalar, sum of v**2


def _finish(v: torch.Tensor, idx: torch.Tensor, sq: torch.Tensor, residual_out) -> TopKCode:
    idx = torch.sort(idx).values
    values = v[idx]
    if residual_out is not None:
        if residual_out.data_ptr() != v.data_ptr():
            residual_out.copy_(v)
        residual_out.index_fill_(0, idx, 0.0)
    return TopKCode(values, idx.to(torch.int32), sq)


def topk_ef_torch(x, residual, k, residual_out=None) -> TopKCode:
    v = x if residual is None else x + residual
    idx = torch.topk(v.abs(), k, sorted=False).indices if k else v.new_zeros(0, dtype=torch.int64)
    return _finish(v, idx, torch.dot(v, v), residual_out)


def sample_threshold(v_abs_at: callable, n: int, k: int, seed: int, sample_fraction: float, device) -> float | None:
    """A magnitude that a little more than ``k`` of ``n`` entries reach; ``None``: sample it all.

    ``v_abs_at(positions)`` returns ``|v|`` at the given int64 positions.
    """
    size = max(int(sample_fraction * n), 4096)
    if size * 4 >= n or k * 4 >= n:
        return None
    positions = (uniform(seed, size, device) * n).to(torch.int64).clamp_(max=n - 1)
    sample = v_abs_at(positions)
    # The sample holds about m = size * k / n of the top-k entries, give or take sqrt(m):
    # the threshold at rank m + 4 sqrt(m) + 1 lets more than k entries pass in all but rare draws.
    expected = size * k / n
    rank = max(1, min(size, math.ceil(expected + 4.0 * math.sqrt(expected) + 1.0)))
    return float(torch.topk(sample, rank, sorted=False).values.min())


def topk_ef(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    k: int,
    residual_out: torch.Tensor | None = None,
    seed: int = 0,
    sample_fraction: float = 0.01,
) -> TopKCode:
    """The ``k`` largest-magnitude entries of ``v = x + residual``; see the module doc."""
    _check(x, "x")
    n = x.numel()
    for t, name in ((residual, "residual"), (residual_out, "residual_out")):
        if t is not None:
            _check(t, name)
            if t.numel() != n:
                raise ValueError(f"`{name}` has {t.numel()} elements, `x` has {n}")
    if not 0 <= k <= n:
        raise ValueError(f"`k` must be in [0, {n}]; got {k}")
    path = path_for(x)
    if path == "torch" or k == 0:
        return topk_ef_torch(x, residual, k, residual_out)
    if path == "cpu":
        from kernels import cpu as impl
    else:
        from kernels import triton_topk as impl
    # v lives in residual_out when there is one (it becomes the new residual), else in x itself
    # (no residual) or in a scratch buffer.
    if residual is None:
        v = x
    else:
        v = residual_out if residual_out is not None else torch.empty_like(x)
        impl.add(x, residual, v)
    threshold = sample_threshold(lambda pos: v[pos].abs(), n, k, seed, sample_fraction, x.device)
    if threshold is None:
        return _finish(v, torch.topk(v.abs(), k, sorted=False).indices, torch.dot(v, v), residual_out)
    candidates, sq = impl.select_at_least(v, threshold)
    if candidates.numel() < k:  # a rare draw: fall back to the exact selection
        idx = torch.topk(v.abs(), k, sorted=False).indices
    else:
        idx = candidates[torch.topk(v[candidates].abs(), k, sorted=False).indices]
    return _finish(v, idx, sq, residual_out)


def scatter_add(values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out[indices[r]] += values[r]`` for every payload ``r``, in order; returns ``out``.

    Indices within one payload must be distinct (top-k and rand-k payloads are).
    """
    _check(out, "out")
    if len(values) != len(indices):
        raise ValueError(f"{len(values)} value tensors but {len(indices)} index tensors")
    if values and path_for(out) == "triton":
        from kernels import triton_topk

        return triton_topk.scatter_add(values, indices, out)
    for val, idx in zip(values, indices):
        out.index_add_(0, idx.to(torch.int64), val.to(torch.float32))
    return out
