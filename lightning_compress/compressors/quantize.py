"""Quantizers: scaled sign, QSGD, TernGrad and natural compression.

Block-wise quantizers split the input into blocks of ``block_size`` elements (the last
one may be shorter) and send one fp32 scale per block. Codes are bit-packed with
:mod:`kernels`; payloads are one flat uint8 buffer laid out as listed per class.
"""

from __future__ import annotations

import math

import torch

from lightning_compress.compressors.base import Compressor, Encoded, num_blocks, pack_parts, split_parts
from lightning_compress_kernels import pack_bits, packed_nbytes, unpack_bits
from lightning_compress_kernels._blocks import as_blocks as _blocks
from lightning_compress_kernels.qsgd import qsgd_decode_add, qsgd_encode
from lightning_compress_kernels.sign import (
    block_stats,
    sign_decode_add,
    sign_decode_multi,
    sign_ef,
    sign_ef_multi,
    sign_server_step,
)

__all__ = ["SignCompressor", "QSGDCompressor", "TernGradCompressor", "NaturalCompressor"]


class _BlockQuantizer(Compressor):
    def _block(self, numel: int) -> int:
        return max(1, min(self.block_size, numel))


class SignCompressor(_BlockQuantizer):
    """Scaled sign: ``C(x) = mean(|x_b|) * sign(x)`` per block, one bit per element.

    Layout: fp32 scale per block, then the sign bits (1 = non-negative) packed 8 per byte.
    Biased; ``||C(x) - x||^2 = ||x||^2 - sum_b ||x_b||_1^2 / |b|`` exactly, so alpha >= 1/block.
    """

    name = "sign"
    fused_scale = True
    fused_velocity = True

    def payload_numel(self, numel: int) -> int:
        return 4 * num_blocks(numel, self._block(numel)) + packed_nbytes(numel, 1)

    def nominal_bits_per_element(self) -> float:
        return 1.0 + 32.0 / self.block_size

    def alpha(self, numel: int) -> float:
        return 1.0 / self._block(numel) if numel else 1.0

    def _layout(self, numel: int) -> list[tuple[int, torch.dtype]]:
        return [(num_blocks(numel, self._block(numel)), torch.float32), (packed_nbytes(numel, 1), torch.uint8)]

    def _encoded(self, code, numel: int) -> Encoded:
        # ||v - C(v)||^2 = sum_b (||v_b||^2 - len_b * scale_b^2), since scale_b = ||v_b||_1 / len_b;
        # NaN where a block is not finite (see lightning_compress_kernels.sign.block_stats).
        sq, err = block_stats(code, numel, self._block(numel))
        return Encoded(pack_parts([code.scales, code.packed]), sq.double().sum(), err.double().sum())

    def compress(self, x, residual=None, *, seed=0, residual_out=None) -> Encoded:
        code = sign_ef(x, residual, block=self._block(x.numel()), residual_out=residual_out)
        return self._encoded(code, x.numel())

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.compress(x.contiguous()).payload

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        return self.decode_add_(payload, torch.zeros(numel, dtype=torch.float32, device=payload.device))

    def decode_add_many_(self, payloads, out, seeds=()) -> torch.Tensor:
        parts = [split_parts(p, self._layout(out.numel())) for p in payloads]
        return sign_decode_add([s for s, _ in parts], [b for _, b in parts], out, block=self._block(out.numel()))

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.decode_add_many_([payload], out)

    def encode_batch(self, xs, residuals, residuals_out, wire, offsets, *, seeds, scale=1.0, velocity=None):
        blocks = [self._block(x.numel()) for x in xs]
        sq, err = sign_ef_multi(xs, residuals, residuals_out, wire, offsets, blocks=blocks, scale=scale,
                                velocity=velocity)  # fmt: skip
        return sq.double().sum(), err.double().sum()

    def decode_batch(self, wires, offsets, outs, seeds) -> None:
        sign_decode_multi(wires, offsets, outs, blocks=[self._block(o.numel()) for o in outs], assign=True)

    def server_compress(self, payloads, seeds, server_error, server_error_out, seed) -> Encoded:
        numel = server_error.numel()
        parts = [split_parts(p, self._layout(numel)) for p in payloads]
        code = sign_server_step(
            [s for s, _ in parts], [b for _, b in parts], server_error,
            block=self._block(numel), server_error_out=server_error_out,
        )
        return self._encoded(code, numel)


class QSGDCompressor(_BlockQuantizer):
    """QSGD (Alistarh et al., NeurIPS 2017) with ``s = 2**bits - 1`` levels per block norm.

    ``Q(x_i) = ||x_b|| * sign(x_i) * l_i / s`` with ``l_i`` the stochastic rounding of
    ``s |x_i| / ||x_b||`` by the counter-based generator of :mod:`lightning_compress_kernels.rng` (so a
    payload is reproducible from the seed on every kernel path; see :mod:`lightning_compress_kernels.qsgd`). Layout: fp32 norm per block, sign bits packed 8 per byte, then
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
        code = qsgd_encode(x.contiguous(), bits=self.bits, block=self._block(x.numel()), seed=seed)
        return pack_parts(code)

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        return self.decode_add_(payload, torch.zeros(numel, dtype=torch.float32, device=payload.device))

    def decode_add_many_(self, payloads, out, seeds=()) -> torch.Tensor:
        parts = [split_parts(p, self._layout(out.numel())) for p in payloads]
        return qsgd_decode_add(
            *(list(col) for col in zip(*parts)), out, bits=self.bits, block=self._block(out.numel())
        )

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.decode_add_many_([payload], out)


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
