"""Quantizers: scaled sign, QSGD, TernGrad and natural compression.

Block-wise quantizers split the input into blocks of ``block_size`` elements (the last
one may be shorter) and send one fp32 scale per block. Codes are bit-packed with
:mod:`kernels`; payloads are one flat uint8 buffer laid out as listed per class.
"""

from __future__ import annotations

import math

import torch

from kernels import pack_bits, packed_nbytes, unpack_bits
from lightning_compress.compressors.base import Compressor, num_blocks, pack_parts, split_parts

__all__ = ["SignCompressor", "QSGDCompressor", "TernGradCompressor", "NaturalCompressor"]


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``x`` as ``(num_blocks, block_size)``, zero-padding the last block."""
    pad = num_blocks(x.numel(), block_size) * block_size - x.numel()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block_size)


def _block_lengths(numel: int, block_size: int, device: torch.device) -> torch.Tensor:
    lengths = torch.full((num_blocks(numel, block_size),), float(block_size), device=device)
    if numel % block_size:
        lengths[-1] = numel % block_size
    return lengths


class _BlockQuantizer(Compressor):
    def _block(self, numel: int) -> int:
        return max(1, min(self.block_size, numel))


class SignCompressor(_BlockQuantizer):
    """Scaled sign: ``C(x) = mean(|x_b|) * sign(x)`` per block, one bit per element.

    Layout: fp32 scale per block, then the sign bits (1 = non-negative) packed 8 per byte.
    Biased; ``||C(x) - x||^2 = ||x||^2 - sum_b ||x_b||_1^2 / |b|`` exactly, so alpha >= 1/block.
    """

    name = "sign"

    def payload_numel(self, numel: int) -> int:
        return 4 * num_blocks(numel, self._block(numel)) + packed_nbytes(numel, 1)

    def nominal_bits_per_element(self) -> float:
        return 1.0 + 32.0 / self.block_size

    def alpha(self, numel: int) -> float:
        return 1.0 / self._block(numel) if numel else 1.0

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, block = x.numel(), self._block(x.numel())
        scales = _blocks(x.abs(), block).sum(dim=1) / _block_lengths(n, block, x.device)
        return pack_parts([scales, pack_bits((x >= 0).to(torch.uint8), 1)])

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        block = self._block(numel)
        nb = num_blocks(numel, block)
        scales, packed = split_parts(payload, [(nb, torch.float32), (packed_nbytes(numel, 1), torch.uint8)])
        signs = unpack_bits(packed, 1, numel).to(torch.float32).mul_(2).sub_(1)
        return _blocks(signs, block).mul_(scales.unsqueeze(1)).reshape(-1)[:numel]


class QSGDCompressor(_BlockQuantizer):
    """QSGD (Alistarh et al., NeurIPS 2017) with ``s = 2**bits - 1`` levels per block norm.

    ``Q(x_i) = ||x_b|| * sign(x_i) * l_i / s`` with ``l_i`` the stochastic rounding of
    ``s |x_i| / ||x_b||``. Layout: fp32 norm per block, sign bits packed 8 per byte, then
    ``bits``-bit level codes packed. Unbiased, omega = min(B / s^2, sqrt(B) / s).
    """

    name = "qsgd"
    unbiased = True

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _layout(self, numel: int) -> list[tuple[int, torch.dtype]]:
        return [
            (num_blocks(numel, self._block(numel)), torch.float32),
            (packed_nbytes(numel, 1), torch.uint8),
            (packed_nbytes(numel, self.bits), torch.uint8),
        ]

    def payload_numel(self, numel: int) -> int:
        return sum(n * (4 if dt == torch.float32 else 1) for n, dt in self._layout(numel))

    def nominal_bits_per_element(self) -> float:
        return self.bits + 1.0 + 32.0 / self.block_size

    def omega(self, numel: int) -> float:
        block, s = self._block(numel), self.levels
        return min(block / s**2, math.sqrt(block) / s)

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, block = x.numel(), self._block(x.numel())
        magnitude = _blocks(x.abs(), block)
        # Norms via the block max, so that squares neither overflow (|x| ~ 1e20 and up) nor
        # underflow (|x| ~ 1e-20 and below) in fp32: ||x_b|| = max|x_b| * ||x_b / max|x_b|||.
        peak = magnitude.amax(dim=1, keepdim=True)
        unit = magnitude / torch.where(peak > 0, peak, torch.ones_like(peak))
        unit_norms = torch.linalg.vector_norm(unit, dim=1, keepdim=True)
        norms = (unit_norms * peak).reshape(-1)
        safe = torch.where(unit_norms > 0, unit_norms, torch.ones_like(unit_norms))
        scaled = (unit / safe * self.levels).reshape(-1)[:n]
        noise = torch.rand(n, generator=self._generator(seed, x.device), device=x.device)
        levels = torch.floor(scaled + noise).clamp_(0, self.levels).to(torch.uint8)
        return pack_parts([norms, pack_bits((x >= 0).to(torch.uint8), 1), pack_bits(levels, self.bits)])

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        block = self._block(numel)
        norms, signs, codes = split_parts(payload, self._layout(numel))
        signs = unpack_bits(signs, 1, numel).to(torch.float32).mul_(2).sub_(1)
        values = unpack_bits(codes, self.bits, numel).to(torch.float32).mul_(signs).div_(self.levels)
        return _blocks(values, block).mul_(norms.unsqueeze(1)).reshape(-1)[:numel]


class TernGradCompressor(_BlockQuantizer):
    """TernGrad (Wen et al., NeurIPS 2017): ``Q(x_i) = max|x_b| * sign(x_i) * b_i``.

    ``b_i`` is Bernoulli(|x_i| / max|x_b|). Layout: fp32 max per block, then 2-bit codes
    (0 -> 0, 1 -> +1, 2 -> -1) packed 4 per byte. Unbiased, omega = sqrt(B) - 1.
    """

    name = "terngrad"
    unbiased = True

    def _layout(self, numel: int) -> list[tuple[int, torch.dtype]]:
        return [(num_blocks(numel, self._block(numel)), torch.float32), (packed_nbytes(numel, 2), torch.uint8)]

    def payload_numel(self, numel: int) -> int:
        nb, (packed, _) = self._layout(numel)[0][0], self._layout(numel)[1]
        return 4 * nb + packed

    def nominal_bits_per_element(self) -> float:
        return 2.0 + 32.0 / self.block_size

    def omega(self, numel: int) -> float:
        return math.sqrt(self._block(numel)) - 1.0

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, block = x.numel(), self._block(x.numel())
        blocks = _blocks(x, block)
        scales = blocks.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        prob = (blocks.abs() / safe).reshape(-1)[:n]
        keep = torch.rand(n, generator=self._generator(seed, x.device), device=x.device) < prob
        codes = torch.where(keep, torch.where(x >= 0, 1, 2), 0).to(torch.uint8)
        return pack_parts([scales, pack_bits(codes, 2)])

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        block = self._block(numel)
        scales, packed = split_parts(payload, self._layout(numel))
        codes = unpack_bits(packed, 2, numel)
        values = (codes == 1).to(torch.float32) - (codes == 2).to(torch.float32)
        return _blocks(values, block).mul_(scales.unsqueeze(1)).reshape(-1)[:numel]


class NaturalCompressor(Compressor):
    """Natural compression (Horvath et al., 2019): random rounding to a power of two.

    ``2^e <= |x| < 2^(e+1)`` rounds up with probability ``|x| / 2^e - 1``. Layout: sign
    bits packed 8 per byte, then one byte per element holding the biased exponent
    ``e + 127`` (0 encodes zero), 9 bits per element. Magnitudes below ``2^-126`` round
    to 0 or ``2^-126``; the top exponent saturates. Unbiased, omega = 1/8.
    """

    name = "natural"
    unbiased = True
    _MIN_EXP, _MAX_EXP = -126, 127

    def payload_numel(self, numel: int) -> int:
        return packed_nbytes(numel, 1) + numel

    def nominal_bits_per_element(self) -> float:
        return 9.0

    def omega(self, numel: int) -> float:
        return 1.0 / 8.0

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        magnitude = x.abs()
        _, exp = torch.frexp(magnitude)  # magnitude = m * 2^exp, m in [0.5, 1)
        low_exp = (exp - 1).clamp_(min=self._MIN_EXP)
        low = torch.ldexp(torch.ones_like(magnitude), low_exp)
        tiny = magnitude < 2.0**self._MIN_EXP
        # Below the smallest normal the choice is between 0 and 2^-126.
        prob_up = torch.where(tiny, magnitude / low, magnitude / low - 1.0)
        up = torch.rand(x.numel(), generator=self._generator(seed, x.device), device=x.device) < prob_up
        code = torch.where(tiny, up.to(exp.dtype) * (self._MIN_EXP + 127), low_exp + 127 + up.to(exp.dtype))
        code = torch.where(magnitude == 0, 0, code).clamp_(0, self._MAX_EXP + 127).to(torch.uint8)
        return pack_parts([pack_bits((x >= 0).to(torch.uint8), 1), code])

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        packed, code = split_parts(payload, [(packed_nbytes(numel, 1), torch.uint8), (numel, torch.uint8)])
        signs = unpack_bits(packed, 1, numel).to(torch.float32).mul_(2).sub_(1)
        exp = code.to(torch.int32) - 127
        values = torch.ldexp(torch.ones(numel, device=payload.device), exp)
        return torch.where(code == 0, 0.0, values).mul_(signs)
