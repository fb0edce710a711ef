"""PowerSGD's exchange: two allreduces per bucket, issued from the hook's thread.

For every compressed tensor of a bucket, viewed as an ``n x m`` matrix ``M_i = x_i + e_i`` (see
:mod:`lightning_compress.compressors.powersgd`), with the shared factor ``Q`` (``m x r``):

1. ``encode`` (hook thread): ``P_i = M_i Q`` for every tensor into one fp32 wire; ``launch``
   allreduces it. Tensors whose factors would not be smaller travel in the same wire as they are.
2. ``launch_second`` (hook thread, a later hook call or the step's drain, as for the two-pass
   transport): ``P = orth(sum_i P_i)``, the same on every rank; ``Q_i = M_i^T P`` into a second
   wire, and this rank's error ``e_i = M_i - P Q_i^T`` into its error buffer; allreduce.
3. ``finish`` (completion callback): ``sum_i C(M_i) = P (sum_i Q_i)^T`` into the output; the
   summed ``Q`` is kept to warm-start the next step (:meth:`commit`, after every rank's data
   was seen finite).

Both wires end with an element that is NaN when this rank's input is not finite; any NaN or inf
in a summed wire fails the bucket on every rank (dense fallback, memory and factors untouched).
Bytes per rank: ``2(N-1)/N`` of ``(n + m) r`` values, whatever the number of ranks ``N``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lightning_compress.compressors.powersgd import initial_factor, low_rank_pays, matrix_shape, orthonormalize
from lightning_compress.transport import Batch, Collectives, Transport

__all__ = ["PowerSGDTransport", "bucket_shapes", "factors_for"]


class PowerSGDTransport(Transport):
    """Rank-``r`` power iteration with a shared, warm-started factor: two allreduces.

    ``factors[t]`` is tensor ``t``'s ``Q`` (``m x r``, the same on every rank; ``None`` for a tensor
    that travels as it is); ``factors_out[t]`` receives the summed ``Q`` that :meth:`commit` keeps.
    """

    passes = 2

    def __init__(
        self,
        comm: Collectives,
        batch: Batch,
        *,
        shapes: Sequence[tuple[int, int]],
        factors: Sequence[torch.Tensor | None],
        factors_out: Sequence[torch.Tensor | None],
    ):
        self.comm, self.batch = comm, batch
        self.shapes = list(shapes)
        self.factors, self.factors_out = list(factors), list(factors_out)
        self.low_rank = [q is not None for q in self.factors]
        # Wire 1: P (n x r) of every low-rank tensor, the others as they are; wire 2: Q (m x r).
        self.offsets1, self.offsets2, at1, at2 = [], [], 0, 0
        for (n, m), q in zip(self.shapes, self.factors):
            self.offsets1.append(at1)
            self.offsets2.append(at2)
            if q is None:
                at1 += n * m
            else:
                at1 += n * q.shape[1]
                at2 += m * q.shape[1]
        self.size1, self.size2 = at1 + 1, at2 + 1  # + the flag element
        self.mats: list[torch.Tensor] = []
        self.errors: list[bool] = []  # mats[t] is this rank's error buffer (EF), to be turned into the error
        self.ps: list[torch.Tensor | None] = []
        self.err = torch.zeros((), dtype=torch.float64, device=batch.device)
        self.norms: list[torch.Tensor] = []

    def new_wire(self) -> torch.Tensor:
        return torch.zeros(self.size1, dtype=torch.float32, device=self.batch.device)

    def set_flag(self, wire: torch.Tensor, finite: torch.Tensor) -> None:
        wire[-1] = torch.where(finite, 0.0, float("nan"))

    def _piece(self, wire: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
        return wire[offset : offset + rows * cols].view(rows, cols)

    def encode(self, wire, xs, residuals, residuals_out, scale: float, velocity=None):
        """``P_i = (scale x + e) Q`` into ``wire``; returns ``(sum ||M_i||^2, sum of the errors)``; the second
        is filled in by :meth:`launch_second` (read it after the step's drain)."""
        if velocity is not None:
            raise ValueError("the PowerSGD exchange forms no velocity of its own")
        norm = torch.zeros((), dtype=torch.float64, device=wire.device)
        for t, (x, res, out) in enumerate(zip(xs, residuals, residuals_out)):
            n, m = self.shapes[t]
            if res is not None:  # M = scale x + e in one pass, in the error buffer (it becomes the new error in place)
                mat = torch.add(res, x, alpha=scale, out=out) if out is not None else torch.add(res, x, alpha=scale)
            elif scale != 1.0:
                mat = torch.mul(x, scale, out=out) if out is not None else torch.mul(x, scale)
            else:
                mat = out.copy_(x) if out is not None else x
            self.errors.append(out is not None)
            sq = torch.dot(mat, mat).double()  # inf/NaN (or a norm past fp32's range) sends the bucket densely
            norm += sq
            self.norms.append(sq)
            self.mats.append(mat)
            if self.low_rank[t]:
                q = self.factors[t]
                torch.mm(mat.view(n, m), q, out=self._piece(wire, self.offsets1[t], n, q.shape[1]))
            else:
                wire[self.offsets1[t] : self.offsets1[t] + n * m].copy_(mat)
        return norm, self.err

    def launch(self, wire: torch.Tensor) -> torch.futures.Future:
        self.wire1 = wire
        return self.comm.allreduce_async(wire)

    def first_ok(self) -> bool:
        """Every rank's P (and the flags) summed to finite values."""
        return bool(torch.isfinite(self.wire1).all())

    def launch_second(self) -> torch.futures.Future:
        """Orthonormalize the summed P, form this rank's Q and error, and allreduce the Qs (hook thread)."""
        wire = torch.zeros(self.size2, dtype=torch.float32, device=self.batch.device)
        keep_error = []
        for t, mat in enumerate(self.mats):
            n, m = self.shapes[t]
            if not self.low_rank[t]:
                self.ps.append(None)
                keep_error.append(t)
                continue
            r = self.factors[t].shape[1]
            p = orthonormalize(self._piece(self.wire1, self.offsets1[t], n, r))
            self.ps.append(p)
            q_local = self._piece(wire, self.offsets2[t], m, r)
            torch.mm(mat.view(n, m).t(), p, out=q_local)
            # ||M - P P^T M||^2 = ||M||^2 - ||Q_i||^2 (P orthonormal): the error's energy without a pass over it
            self.err += (self.norms[t] - torch.dot(q_local.reshape(-1), q_local.reshape(-1)).double()).clamp(min=0.0)
            if self.errors[t]:
                mat.view(n, m).addmm_(p, q_local.t(), alpha=-1.0)  # e_i = M_i - P Q_i^T, in place
        for t in keep_error:  # sent as it is: no error
            if self.errors[t]:
                self.mats[t].zero_()
        self.wire2 = wire
        return self.comm.allreduce_async(wire)

    def finish(self) -> bool:
        if not bool(torch.isfinite(self.wire2).all()):
            return False
        for t, (out, p) in enumerate(zip(self.batch.outs, self.ps)):
            n, m = self.shapes[t]
            if p is None:
                out.copy_(self.wire1[self.offsets1[t] : self.offsets1[t] + n * m])
                continue
            q = self._piece(self.wire2, self.offsets2[t], m, p.shape[1])
            torch.mm(p, q.t(), out=out.view(n, m))
            self.factors_out[t].copy_(q)
        return True

    def commit(self, state, names: Sequence[str]) -> None:
        """The summed Qs become the factors the next step starts from."""
        for name, q in zip(names, self.factors_out):
            if q is not None:
                state.commit_factor(name, q)


def factors_for(state, names: Sequence[str], shapes: Sequence[tuple[int, int]], device) -> tuple[list, list]:
    """``(factors, factors_out)`` of a bucket's tensors: the kept ``Q`` (a fresh one, the same on every rank,
    drawn from the shared seed, where none fits) and a buffer for the next one; ``None`` where the low-rank
    factors would not be smaller than the tensor."""
    rank = state.config.powersgd_rank
    factors, outs = [], []
    for name, (n, m) in zip(names, shapes):
        if not low_rank_pays(n, m, rank):
            factors.append(None)
            outs.append(None)
            continue
        q = state.factors.get(name)
        if q is None or tuple(q.shape) != (m, rank) or q.device != torch.device(device):
            q = initial_factor(m, rank, state.seed(name, _FACTOR_SEED), device)
        factors.append(q)
        outs.append(state.scratch(name, "factor", m * rank, device).view(m, rank))
    return factors, outs


_FACTOR_SEED = 0x5051  # "PQ": the stream a fresh Q is drawn from


def bucket_shapes(state, names: Sequence[str], numels: Sequence[int]) -> list[tuple[int, int]]:
    """Every tensor's ``(n, m)`` matrix view from the model's shapes (a flat tensor: most nearly square)."""
    shapes = []
    for name, numel in zip(names, numels):
        shape = state.param_shapes.get(name)
        shapes.append(matrix_shape(tuple(shape)) if shape is not None else matrix_shape(numel))
    return shapes
