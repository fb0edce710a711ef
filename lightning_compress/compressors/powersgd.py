"""Low-rank PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019): one step of power iteration.

A gradient is viewed as an ``n x m`` matrix ``M`` (a parameter of shape ``(d0, d1, ...)`` as
``d0 x d1*...``). With a factor ``Q`` (``m x r``) that every rank holds alike::

    P = M Q            # n x r; the ranks' P add up (Q is shared): allreduce
    P = orth(P)        # the same orthonormal basis on every rank
    Q_i = M_i^T P      # m x r; allreduce again
    C(M) = P Q^T       # rank r; the sum over ranks of P Q_i^T

Both messages add up, so the exchange is two allreduces whose size does not grow with the
number of ranks. ``Q`` is warm-started from the previous step's (the same on every rank), which
makes one power-iteration step per training step track the gradient's top subspace. With error
feedback each rank keeps ``M_i - P Q_i^T``, its own compression error. The exchange lives in
:mod:`lightning_compress.powersgd`; this class holds the sizes and the one-rank meaning (a flat
tensor of ``numel`` elements is viewed as the most nearly square matrix it fills).
"""

from __future__ import annotations

import math

import torch

from lightning_compress.compressors.base import Compressor

__all__ = ["PowerSGDCompressor", "matrix_shape", "low_rank_pays", "orthonormalize", "initial_factor"]


def matrix_shape(shape: tuple[int, ...] | int) -> tuple[int, int]:
    """The ``(n, m)`` matrix a tensor is viewed as: ``(d0, numel / d0)`` for a shape, and for a bare
    number of elements the most nearly square ``n x m`` with ``n <= m`` that it fills."""
    if isinstance(shape, int):
        numel = shape
        n = max((d for d in range(1, math.isqrt(max(numel, 1)) + 1) if numel % d == 0), default=1)
        return n, max(numel // n, 1) if numel else 0
    numel = math.prod(shape)
    n = int(shape[0]) if shape else 1
    return n, (numel // n if n else 0)


def low_rank_pays(n: int, m: int, rank: int) -> bool:
    """A rank-``rank`` factor pair ``(n + m) * rank`` is smaller than the matrix ``n * m``."""
    return (n + m) * rank < n * m


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``p`` (``n x r``, ``r <= n``), deterministic: the same
    input gives the same bits on every rank. Rank-deficient input still yields orthonormal columns."""
    q, _ = torch.linalg.qr(p, mode="reduced")
    return q


def initial_factor(m: int, rank: int, seed: int, device: torch.device) -> torch.Tensor:
    """A random ``m x rank`` starting ``Q``, the same on every rank for the same ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(m, rank, generator=gen, dtype=torch.float32).to(device)


class PowerSGDCompressor(Compressor):
    """Rank-``r`` approximation by one power-iteration step: ``(n + m) * r`` fp32 values for ``n * m``.

    Biased and contractive: ``C(M) = P P^T M`` is an orthogonal projection, so ``||M - C(M)|| <= ||M||``;
    from a random start the projection keeps, in expectation, at least ``r / min(n, m)`` of the energy
    (``alpha``), and the warm start keeps much more once the factor has settled. A matrix where the
    factors are not smaller (``(n + m) r >= n m``) travels as it is.
    """

    name = "powersgd"
    # Its messages add up over ranks (P with a shared Q, then Q with a shared P), but a flat payload
    # [P, Q] does not: it travels by its own exchange of two allreduces, not the allreduce transport.
    summable = False
    payload_dtype = torch.float32
    fused_scale = True  # the exchange forms M = grad * scale + e in one pass

    def __init__(self, *, rank: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank = rank

    def __repr__(self) -> str:
        return f"PowerSGDCompressor(rank={self.rank})"

    def payload_numel(self, numel: int) -> int:
        n, m = matrix_shape(numel)
        r = min(self.rank, n, m)
        return (n + m) * r if low_rank_pays(n, m, r) else numel

    def payload_numel_shaped(self, shape: tuple[int, ...]) -> int:
        """Values sent (in both allreduces together) for a parameter of ``shape``."""
        n, m = matrix_shape(tuple(shape))
        return (n + m) * self.rank if low_rank_pays(n, m, self.rank) else n * m

    def nominal_bits_per_element(self) -> float:
        """For a square 1024 x 1024 matrix: ``32 * 2r / 1024`` (the rate depends on the shape)."""
        return 32.0 * 2 * self.rank / 1024

    def alpha(self, numel: int) -> float:
        n, m = matrix_shape(numel)
        return 1.0 if not low_rank_pays(n, m, self.rank) else self.rank / max(1, min(n, m))

    # ----- one rank's meaning: the exchange with a single rank ----------------------------------
    def _factors(self, v: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        n, m = matrix_shape(v.numel())
        if not low_rank_pays(n, m, self.rank):
            return None
        mat = v.view(n, m)
        p = orthonormalize(mat @ initial_factor(m, self.rank, seed, v.device))
        return p, mat.t() @ p

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        factors = self._factors(x, seed)
        if factors is None:
            return x.clone()
        p, q = factors
        return torch.cat([p.reshape(-1), q.reshape(-1)])

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        n, m = matrix_shape(numel)
        if not low_rank_pays(n, m, self.rank):
            return payload.to(torch.float32, copy=True)
        r = self.rank
        p, q = payload[: n * r].view(n, r), payload[n * r : (n + m) * r].view(m, r)
        return (p @ q.t()).reshape(-1)
