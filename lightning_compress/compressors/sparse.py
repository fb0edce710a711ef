"""Sparsifiers: exact top-k, sampled-threshold top-k (DGC) and random-k.

Top-k and DGC payloads carry ``k`` fp32 values then ``k`` int32 indices (64 bits per
kept element). Random-k draws its indices from a seed shared by every rank, so its
payload is the ``k`` values only and payloads of several ranks can be summed.
"""

from __future__ import annotations

import math

import torch

from lightning_compress.compressors.base import Compressor, Encoded, pack_parts, split_parts
from lightning_compress_kernels.topk import scatter_add, sparse_decode_multi, topk_ef, topk_ef_multi

__all__ = ["TopKCompressor", "DGCCompressor", "RandKCompressor"]


class _IndexedSparse(Compressor):
    """Payload = k fp32 values followed by k int32 indices."""

    def k(self, numel: int) -> int:
        return self._count(numel, self.density)

    def payload_numel(self, numel: int) -> int:
        return 8 * self.k(numel)

    def nominal_bits_per_element(self) -> float:
        return 64.0 * self.density

    def alpha(self, numel: int) -> float:
        return self.k(numel) / numel if numel else 1.0

    def _payload(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return pack_parts([x[idx], idx.to(torch.int32)])

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k(numel)
        values, idx = split_parts(payload, [(k, torch.float32), (k, torch.int32)])
        return values, idx.long()

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        return self.decode_add_(payload, torch.zeros(numel, dtype=torch.float32, device=payload.device), seed)

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.decode_add_many_([payload], out)

    def decode_add_many_(self, payloads, out, seeds=()) -> torch.Tensor:
        parts = [self._split(p, out.numel()) for p in payloads]
        return scatter_add([v for v, _ in parts], [i for _, i in parts], out)

    def decode_batch(self, wires, offsets, outs, seeds) -> None:
        sparse_decode_multi(wires, offsets, [self.k(o.numel()) for o in outs], outs, assign=True)


class TopKCompressor(_IndexedSparse):
    """Keep the ``k = ceil(density * n)`` entries of largest magnitude. Biased, alpha = k/n."""

    name = "topk"
    fused_scale = True
    fused_velocity = True

    def encode_batch(self, xs, residuals, residuals_out, wire, offsets, *, seeds, scale=1.0, velocity=None):
        ks = [self.k(x.numel()) for x in xs]
        sq, err = topk_ef_multi(
            xs, residuals, residuals_out, ks, wire, offsets,
            scale=scale, seeds=seeds, sample_fraction=self.sample_fraction, velocity=velocity,
        )  # fmt: skip
        return sq.double().sum(), err.double().sum()

    def compress(self, x, residual=None, *, seed=0, residual_out=None) -> Encoded:
        # The exact top-k, found through a sampled threshold (see lightning_compress_kernels.topk); indices ascending.
        code = topk_ef(
            x, residual, k=self.k(x.numel()), residual_out=residual_out, seed=seed, sample_fraction=self.sample_fraction
        )
        err = (code.sq - torch.dot(code.values, code.values)).clamp_(min=0)
        return Encoded(pack_parts([code.values, code.indices]), code.sq, err)

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.compress(x.contiguous(), seed=seed).payload


class DGCCompressor(_IndexedSparse):
    """Top-k by a threshold estimated on a random sample (Lin et al., ICLR 2018).

    The threshold is a magnitude that a little more than a ``density`` fraction of the
    sample exceeds (a margin of four binomial standard deviations), so that usually more
    than ``k`` entries pass it and the exact top-k of those is kept; when fewer pass, the
    payload is padded with zero values so that it always holds ``k`` entries.
    """

    name = "dgc"

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, k = x.numel(), self.k(x.numel())
        magnitude = x.abs()
        sample_size = max(int(self.sample_fraction * n), min(n, 1024))
        if sample_size >= n:
            return self._payload(x, torch.topk(magnitude, k, sorted=False).indices)
        gen = self._generator(seed, x.device)
        sample = magnitude[torch.randint(0, n, (sample_size,), generator=gen, device=x.device)]
        # The sample holds about m = sample_size * k / n of the top-k entries, give or take
        # sqrt(m). Setting the threshold at rank m + 4 sqrt(m) + 1 of the sample lets more than
        # k entries pass in all but rare draws; the exact top-k of those is then kept.
        expected = sample_size * k / n
        rank_in_sample = max(1, min(sample_size, math.ceil(expected + 4.0 * math.sqrt(expected) + 1.0)))
        threshold = torch.topk(sample, rank_in_sample, sorted=False).values.min()
        idx = torch.nonzero(magnitude >= threshold).reshape(-1)
        if idx.numel() > k:
            idx = idx[torch.topk(magnitude[idx], k, sorted=False).indices]
        values = x[idx]
        if idx.numel() < k:
            pad = k - idx.numel()
            values = torch.cat([values, values.new_zeros(pad)])
            idx = torch.cat([idx, idx.new_zeros(pad)])
        return pack_parts([values, idx.to(torch.int32)])

    def alpha(self, numel: int) -> float:
        # The kept set is a top-m set for some 1 <= m <= k.
        return 1.0 / numel if numel else 1.0


_RANDK_CACHED = 256  # index sets kept: a step's tensors, encoded then decoded


def sample_indices(numel: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``k`` distinct indices of ``range(numel)``, a uniformly random subset drawn from ``gen``, ascending.

    For ``k`` well below ``numel``: draws with replacement and keeps each index's first draw
    until ``k`` are distinct (the set is uniform, as when drawing without replacement), in
    O(k log k) instead of a permutation of the whole tensor; otherwise the first ``k`` of a
    random permutation.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if k * 8 > numel:
        return torch.randperm(numel, generator=gen, device=device)[:k].sort().values
    samples = torch.randint(numel, (k + k // 8 + 16,), generator=gen, device=device)
    while True:
        distinct, inverse = torch.unique(samples, return_inverse=True)
        if distinct.numel() >= k:
            break
        more = torch.randint(numel, (k - distinct.numel() + k // 8 + 16,), generator=gen, device=device)
        samples = torch.cat([samples, more])
    first = torch.full((distinct.numel(),), samples.numel(), dtype=torch.long, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(samples.numel(), device=device), "amin")
    return distinct[first.argsort()[:k]].sort().values


class RandKCompressor(Compressor):
    """Keep ``k`` uniformly random entries scaled by ``n / k``. Unbiased, omega = n/k - 1.

    The indices come from the seed alone, so every rank that uses the same seed picks
    the same entries and the value payloads can be summed by an allreduce.
    """

    name = "randk"
    unbiased = True
    summable = True
    shared_randomness = True
    payload_dtype = torch.float32

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # (numel, k, seed, device) -> indices: a step's encode and decode of each tensor draw once
        self._cached: dict[tuple, torch.Tensor] = {}

    def k(self, numel: int) -> int:
        return self._count(numel, self.density)

    def payload_numel(self, numel: int) -> int:
        return self.k(numel)

    def nominal_bits_per_element(self) -> float:
        return 32.0 * self.density

    def omega(self, numel: int) -> float:
        return numel / self.k(numel) - 1.0 if numel else 0.0

    def indices(self, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        """The ``k`` indices drawn for ``seed`` (the same on every rank)."""
        key = (numel, self.k(numel), seed, str(device))
        idx = self._cached.get(key)
        if idx is None:
            if len(self._cached) >= _RANDK_CACHED:
                self._cached.clear()  # seeds change every step: older entries are not asked for again
            idx = self._cached[key] = sample_indices(numel, key[1], self._generator(seed, device), device)
        return idx

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, k = x.numel(), self.k(x.numel())
        return x[self.indices(n, seed, x.device)] * (n / k if k else 1.0)

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        return self.decode_add_(payload, torch.zeros(numel, dtype=torch.float32, device=payload.device), seed)

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return scatter_add([payload.to(torch.float32)], [self.indices(out.numel(), seed, out.device)], out)
