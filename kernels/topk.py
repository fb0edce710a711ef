"""Top-k sparsification with error feedback, and scatter-accumulate of sparse payloads.

Meaning (the torch twins are the reference):

* ``topk_ef(x, residual, k)``: ``v = x + residual`` (``residual`` may be ``None``); the
  ``k`` entries of largest ``|v|``, as fp32 values and int32 indices in ascending index
  order, and ``sq = sum v**2``; if ``residual_out`` is given it receives ``v`` with the kept
  entries set to zero (``v - C(v)``, the error that feedback carries on).
* ``scatter_add(values, indices, out)``: ``out[indices[r]] += values[r]`` for every payload.
* ``topk_ef_multi`` / ``sparse_decode_multi``: the same for every tensor of a list, with
  ``v = scale * x + residual`` and each payload (``k`` fp32 values, then ``k`` int32 indices)
  at a byte offset of one wire buffer. Its CPU path keeps ties at the ``k``-th magnitude
  lowest index first, so its payloads are a function of ``v`` alone.

The fast paths find the same set without sorting all of ``|v|``: a threshold is read off
a random sample (positions from :func:`lightning_compress_kernels.rng.uniform`) with a margin of four binomial
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

from ._dispatch import implementation
from .rng import stream_keys, uniform
from .sign import _check
from .velocity import Velocity, fused_velocity_ok, velocity_many
from .velocity import velocity as velocity_fn

__all__ = ["TopKCode", "topk_ef", "scatter_add", "sample_threshold", "topk_ef_multi", "sparse_decode_multi"]


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


def sample_plan(n: int, k: int, sample_fraction: float, max_size: int | None = None) -> tuple[int, int] | None:
    """``(sample size, rank in the sample)`` of the threshold for ``k`` of ``n``; ``None``: take all.

    The sample is ``sample_fraction`` of ``n``, at least 4096 entries and at most ``max_size``.
    """
    size = max(int(sample_fraction * n), 4096)
    if max_size is not None:
        size = max(min(size, max_size), 4096)
    if size * 4 >= n or k * 4 >= n:
        return None
    # The sample holds about m = size * k / n of the top-k entries, give or take sqrt(m):
    # the threshold at rank m + 4 sqrt(m) + 1 lets more than k entries pass in all but rare draws.
    expected = size * k / n
    return size, max(1, min(size, math.ceil(expected + 4.0 * math.sqrt(expected) + 1.0)))


def sample_threshold(v_abs_at: callable, n: int, k: int, seed: int, sample_fraction: float, device) -> float | None:
    """A magnitude that a little more than ``k`` of ``n`` entries reach; ``None``: sample it all.

    ``v_abs_at(positions)`` returns ``|v|`` at the given int64 positions.
    """
    plan = sample_plan(n, k, sample_fraction)
    if plan is None:
        return None
    size, rank = plan
    positions = (uniform(seed, size, device) * n).to(torch.int64).clamp_(max=n - 1)
    sample = v_abs_at(positions)
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
    impl = implementation(x, triton="triton_topk")  # its add and select_at_least
    if impl is None or k == 0:
        return topk_ef_torch(x, residual, k, residual_out)
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
    impl = implementation(out, triton="triton_topk", cpu=None) if values else None
    if impl is not None:
        return impl.scatter_add(values, indices, out)
    for val, idx in zip(values, indices):
        out.index_add_(0, idx.to(torch.int64), val.to(torch.float32))
    return out


# ----- many tensors at once ---------------------------------------------------------------
#: Largest threshold sample of the multi-tensor CPU path: each sampled entry is a cache miss,
#: and past this size the sample costs more than the few extra candidates it saves.
MULTI_SAMPLE_MAX = 32768


def sparse_payload_nbytes(k: int) -> int:
    """Bytes of one sparse payload: ``k`` fp32 values, then ``k`` int32 indices."""
    return 8 * k


def _parts(wire: torch.Tensor, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return wire[offset : offset + 4 * k].view(torch.float32), wire[offset + 4 * k : offset + 8 * k].view(torch.int32)


def topk_ef_multi(
    xs: Sequence[torch.Tensor],
    residuals: Sequence[torch.Tensor | None],
    residuals_out: Sequence[torch.Tensor | None],
    ks: Sequence[int],
    wire: torch.Tensor,
    offsets: Sequence[int],
    *,
    scale: float = 1.0,
    seeds: Sequence[int],
    sample_fraction: float = 0.01,
    velocity: Velocity | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_ef` of every ``v = scale * x + residual``, payloads into ``wire`` at ``offsets``.

    ``offsets`` must be multiples of 4. Returns ``(sq, err)`` per tensor (fp32): ``sum v**2``
    and ``||v - C(v)||**2``, both saturated at the largest fp32, or NaN where some value of
    ``v`` is not finite. The CPU path samples, selects and compacts every tensor in C, with
    ``v`` computed on the fly (the product rounded before the sum, as the twin does).
    """
    device = wire.device
    if not xs:
        empty = torch.empty(0, device=device)
        return empty, empty
    if velocity is not None and scale != 1.0:
        raise ValueError(f"with a velocity the input scale is the velocity's `xs`; got scale={scale}")
    cpu = implementation(xs[0], cpu="cpu_multi", fits=lambda: velocity is None or fused_velocity_ok(xs, velocity))
    if cpu is not None:
        samples = []
        for x, k, seed in zip(xs, ks, seeds):
            plan = sample_plan(x.numel(), k, sample_fraction, MULTI_SAMPLE_MAX)
            samples.append(None if plan is None else (*plan, *stream_keys(seed)))
        results = cpu.topk_ef_multi(xs, residuals, residuals_out, ks, wire, offsets, scale, samples, velocity)
        sq, err = [], []
        for t, (s, kept, status) in enumerate(results):
            if status:  # a rare draw let too few entries pass (or a value is NaN): the exact top-k of all
                v = _value(xs[t], residuals[t], residuals_out[t], scale, velocity, t)
                code = _finish(v, _lowest_first(v.abs(), ks[t]), torch.dot(v, v), residuals_out[t])
                s, kept = _stats(code, bool(torch.isfinite(v).all()))
                _put(wire, offsets[t], code)
            sq.append(s)
            err.append(max(s - kept, 0.0) if s == s else s)
        return torch.tensor(sq, device=device), torch.tensor(err, device=device)
    if velocity is not None:
        xs = velocity_many(xs, velocity)
    sq, err = [], []
    for x, e, r, k, off, seed in zip(xs, residuals, residuals_out, ks, offsets, seeds):
        v = x if scale == 1.0 else x * scale
        finite = torch.isfinite(v).all() & (True if e is None else torch.isfinite(e).all())
        code = topk_ef(v, e, k=k, residual_out=r, seed=seed, sample_fraction=sample_fraction)
        _put(wire, off, code)
        # inf in v + e is always among the k largest: with finite inputs, finite values mean a finite v.
        s, kept = _stats(code, finite & torch.isfinite(code.values).all())
        sq.append(s.reshape(1))
        err.append(torch.where(torch.isnan(s), s, (s - kept).clamp(min=0)).reshape(1))
    return torch.cat(sq), torch.cat(err)


def _lowest_first(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` indices with ties at the ``k``-th magnitude kept lowest index first (as the C path)."""
    kth = torch.topk(magnitude, k, sorted=True).values[-1]
    above = (magnitude > kth).nonzero().reshape(-1)
    tied = (magnitude == kth).nonzero().reshape(-1)[: k - above.numel()]
    return torch.cat([above, tied])


def _value(x, residual, residual_out, scale, velocity=None, t=0) -> torch.Tensor:
    """``v`` of one tensor: ``residual_out`` holds it after the C pass, else it is formed again."""
    if residual_out is not None:
        return residual_out
    if velocity is not None:  # s again, into scratch (the pass wrote the new velocity already)
        s, u = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
        velocity_fn(x, velocity.p[t], velocity.u_old[t], u, s, **velocity.scalars())
        x, scale = s, 1.0
    v = x if scale == 1.0 else x * scale
    return v if residual is None else v + residual


def _put(wire: torch.Tensor, offset: int, code: TopKCode) -> None:
    values, idx = _parts(wire, offset, code.values.numel())
    values.copy_(code.values)
    idx.copy_(code.indices)


def _stats(code: TopKCode, finite):
    """``(sq, kept_sq)`` as the hook reads them: NaN sq when some value of ``v`` is not finite,
    else both saturated at the largest fp32 (a square may overflow where its value does not)."""
    top = torch.finfo(torch.float32).max
    sq = code.sq.clamp(max=top)
    kept = torch.dot(code.values, code.values).clamp(max=top)
    if isinstance(finite, bool):
        return (float(sq) if finite else float("nan")), float(kept)
    return torch.where(finite, sq, torch.full_like(sq, float("nan"))), kept


def sparse_decode_multi(
    wires: Sequence[torch.Tensor],
    offsets: Sequence[int],
    ks: Sequence[int],
    outs: Sequence[torch.Tensor],
    *,
    assign: bool = True,
) -> Sequence[torch.Tensor]:
    """``outs[t] (+)= sum_r scatter(wires[r] at offsets[t])`` for every tensor; returns ``outs``.

    On the CPU paths an index outside its tensor (a corrupt payload) raises instead of writing.
    """
    if not outs:
        return outs
    cpu = implementation(outs[0], cpu="cpu_multi")
    if cpu is not None:
        return cpu.sparse_decode_multi(wires, offsets, ks, outs, assign)
    for out, off, k in zip(outs, offsets, ks):
        parts = [_parts(w, off, k) for w in wires]
        if assign:
            out.zero_()
        scatter_add([v for v, _ in parts], [i for _, i in parts], out)
    return outs
