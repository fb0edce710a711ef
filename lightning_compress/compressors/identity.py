"""Dense payloads: fp32 (no compression), fp16 and bf16 casts."""

from __future__ import annotations

import torch

from lightning_compress.compressors.base import Compressor

__all__ = ["NoneCompressor", "FP16Compressor", "BF16Compressor"]


class _CastCompressor(Compressor):
    summable = True

    def payload_numel(self, numel: int) -> int:
        return numel

    def nominal_bits_per_element(self) -> float:
        return 8.0 * torch.empty((), dtype=self.payload_dtype).element_size()

    def alpha(self, numel: int) -> float:
        # Round-to-nearest keeps each relative error within eps/2 (inside the format's range).
        return 1.0 - (torch.finfo(self.payload_dtype).eps / 2) ** 2 if self.payload_dtype != torch.float32 else 1.0

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return x.to(self.payload_dtype, copy=True)

    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        return payload.to(torch.float32, copy=True)

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return out.add_(payload)


class NoneCompressor(_CastCompressor):
    """No compression: the fp32 values themselves (the exactness baseline)."""

    name = "none"
    payload_dtype = torch.float32


class FP16Compressor(_CastCompressor):
    """Round to IEEE half precision (16 bits per element). Biased, near-identity.

    Magnitudes above fp16's largest finite value (65504) saturate instead of becoming inf,
    so with error feedback the excess stays in the residual rather than poisoning it.
    """

    name = "fp16"
    payload_dtype = torch.float16
    _MAX = torch.finfo(torch.float16).max

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return x.clamp(-self._MAX, self._MAX).to(torch.float16)


class BF16Compressor(_CastCompressor):
    """Round to bfloat16 (16 bits per element, fp32's exponent range). Biased, near-identity."""

    name = "bf16"
    payload_dtype = torch.bfloat16
