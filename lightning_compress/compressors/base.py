"""The compressor contract: a flat fp32 tensor in, a fixed-size wire payload out, and back."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple, Sequence

import torch

from lightning_compress_kernels._blocks import num_blocks
from lightning_compress_kernels.velocity import Velocity, velocity_many

__all__ = ["Compressor", "Encoded", "pack_parts", "split_parts", "num_blocks", "bytes_as", "WIRE_ALIGN", "wire_layout"]

#: Every payload in a wire buffer starts at a multiple of this many bytes, so its fp32 and
#: int32 parts can be viewed in place (no copy) on every rank's part of a gathered buffer.
WIRE_ALIGN = 8


def _aligned(nbytes: int) -> int:
    return -(-nbytes // WIRE_ALIGN) * WIRE_ALIGN


def wire_layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """``(offsets, total)`` of payloads of ``nbytes`` laid out back to back, each aligned."""
    offsets, at = [], 0
    for size in nbytes:
        offsets.append(at)
        at += _aligned(size)
    return offsets, at


def pack_parts(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of any dtype into one flat uint8 wire buffer."""
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def bytes_as(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a uint8 slice as ``dtype``, copying it only when it is misaligned."""
    if buffer.dtype == dtype:
        return buffer
    if buffer.storage_offset() % torch.empty((), dtype=dtype).element_size():
        buffer = buffer.clone()
    return buffer.view(dtype)


def split_parts(buffer: torch.Tensor, spec: Sequence[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_parts` for a list of ``(numel, dtype)``."""
    out, offset = [], 0
    for numel, dtype in spec:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append(bytes_as(buffer[offset : offset + nbytes], dtype))
        offset += nbytes
    if offset != buffer.numel():
        raise RuntimeError(f"payload holds {buffer.numel()} bytes, layout expects {offset}")
    return out


class Encoded(NamedTuple):
    """What :meth:`Compressor.compress` returns for ``v = x + residual``."""

    payload: torch.Tensor
    norm_sq: torch.Tensor  # ||v||^2 (0-d fp32)
    err_sq: torch.Tensor  # ||v - C(v)||^2 (0-d fp32)


class Compressor(ABC):
    """Turns a flat fp32 tensor into a fixed-size payload and back.

    The payload size depends only on ``numel`` and the compressor's settings, never on
    the values, so payloads of every rank line up in fixed-size collectives.

    Class attributes:
        name: the registry name (``CompressionConfig.compressor``).
        unbiased: ``E[decode(encode(x))] == x``; such compressors report ``omega``
            with ``E||Q(x) - x||^2 <= omega ||x||^2``.
        summable: payloads of several ranks can be added by an allreduce and the sum
            decodes to the sum of the decoded payloads.
        shared_randomness: the seed must be the same on every rank (rand-k indices).
        payload_dtype: dtype of the payload tensor (``uint8`` for packed layouts).
        fused_scale: :meth:`encode_batch` applies its ``scale`` inside the kernel; other
            compressors get inputs already scaled (``scale`` 1).

    The hook uses the batch pair: :meth:`encode_batch` writes every tensor's payload of a
    bucket into one wire buffer, :meth:`decode_batch` sums every rank's payloads into the
    outputs. The per-tensor methods below define what they mean.
    """

    name: ClassVar[str]
    unbiased: ClassVar[bool] = False
    summable: ClassVar[bool] = False
    shared_randomness: ClassVar[bool] = False
    payload_dtype: ClassVar[torch.dtype] = torch.uint8
    #: :meth:`encode_batch` reads fp32 inputs scaled by ``scale`` itself (one pass, no copy)
    fused_scale: ClassVar[bool] = False
    #: :meth:`encode_batch` forms the optimizer's momentum (``velocity``) inside its own pass
    fused_velocity: ClassVar[bool] = False

    def __init__(self, *, density: float = 1.0, bits: int = 8, block_size: int = 1024, sample_fraction: float = 0.01):
        self.density = density
        self.bits = bits
        self.block_size = block_size
        self.sample_fraction = sample_fraction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(density={self.density}, bits={self.bits}, block_size={self.block_size})"

    # ----- sizes -----------------------------------------------------------------------
    @abstractmethod
    def payload_numel(self, numel: int) -> int:
        """Elements of ``payload_dtype`` in the payload for an input of ``numel`` elements."""

    def payload_nbytes(self, numel: int) -> int:
        """Bytes of the payload for an input of ``numel`` elements."""
        return self.payload_numel(numel) * torch.empty((), dtype=self.payload_dtype).element_size()

    @abstractmethod
    def nominal_bits_per_element(self) -> float:
        """Bits per element on the wire for a large input, from the format's definition."""

    def bits_per_element(self, numel: int) -> float:
        """Bits per element on the wire for an input of ``numel`` elements (padding included)."""
        return 8.0 * self.payload_nbytes(numel) / max(numel, 1)

    # ----- theory ----------------------------------------------------------------------
    def omega(self, numel: int) -> float | None:
        """Variance bound of an unbiased compressor, ``None`` for a biased one."""
        return None

    def alpha(self, numel: int) -> float:
        """Contraction: ``E||C(x) - x||^2 <= (1 - alpha) ||x||^2``; 0 when there is no such bound."""
        omega = self.omega(numel)
        return max(0.0, 1.0 - omega) if omega is not None else 0.0

    # ----- data ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Compress a flat fp32 tensor into a new payload tensor (never a view of ``x``)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, numel: int, seed: int = 0) -> torch.Tensor:
        """Rebuild a flat fp32 tensor of ``numel`` elements from a payload.

        Only ``shared_randomness`` compressors read ``seed`` here, and it is the same on
        every rank, so any rank can decode any rank's payload.
        """

    def decode_add_(self, payload: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Add the decoded payload into ``out`` (fp32, flat) in place."""
        return out.add_(self.decode(payload, out.numel(), seed))

    def decode_add_many_(self, payloads: Sequence[torch.Tensor], out: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Add every decoded payload into ``out`` in order (one fused pass where a kernel exists)."""
        for payload, seed in zip(payloads, seeds):
            self.decode_add_(payload, out, seed)
        return out

    def compress(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        seed: int = 0,
        residual_out: torch.Tensor | None = None,
    ) -> Encoded:
        """Encode ``v = x + residual`` (``None``: 0) and, into ``residual_out``, write ``v - C(v)``.

        This is the hot path of error feedback; compressors with a fused kernel do it in one
        pass over ``v`` without materializing ``v`` or ``C(v)``. ``residual_out`` may be
        ``residual`` itself. ``norm_sq`` is NaN when ``v - C(v)`` is not finite: a value of ``v``,
        or a scale or norm the payload carries (a QSGD block norm of finite values can overflow),
        is not, and the hook must not send the payload or keep the residual.
        """
        v = x if residual is None else x + residual
        payload = self.encode(v, seed)
        error = v - self.decode(payload, v.numel(), seed)
        if residual_out is not None:
            residual_out.copy_(error)
        norm_sq = torch.dot(v, v)
        norm_sq = torch.where(torch.isfinite(error).all(), norm_sq, torch.full_like(norm_sq, float("nan")))
        return Encoded(payload, norm_sq, torch.dot(error, error))

    # ----- a bucket's tensors at once (what the hook calls) ---------------------------------
    def encode_batch(
        self,
        xs: Sequence[torch.Tensor],
        residuals: Sequence[torch.Tensor | None],
        residuals_out: Sequence[torch.Tensor | None],
        wire: torch.Tensor,
        offsets: Sequence[int],
        *,
        seeds: Sequence[int],
        scale: float = 1.0,
        velocity: Velocity | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every ``v_t = scale * xs[t] + residuals[t]`` into ``wire`` at ``offsets[t]``.

        ``wire`` is a flat buffer of ``payload_dtype`` elements (uint8 for packed layouts) and
        offsets count its elements. ``residuals_out[t]`` (if given) receives ``v_t - C(v_t)``.
        Returns ``(sum ||v_t||^2, sum ||v_t - C(v_t)||^2)`` as 0-d float64 tensors on the wire's
        device, without a host sync. The first is NaN when some value of a ``v_t``, or a scale or
        norm the payload carries, is not finite: the hook then sends the bucket densely. Sums
        of squares that overflow fp32 where the values do not are saturated instead. Only
        ``fused_scale`` compressors take ``scale != 1``.

        With ``velocity`` (:class:`lightning_compress_kernels.velocity.Velocity`, ``scale`` 1) the input of tensor
        ``t`` is the optimizer's momentum formed from ``xs[t]``, ``s_t``, and the new velocities
        are written; ``fused_velocity`` compressors form it inside their own pass.
        """
        if scale != 1.0 and not self.fused_scale:
            raise ValueError(f"{type(self).__name__} takes inputs already scaled (scale 1); got scale={scale}")
        if velocity is not None:
            xs = velocity_many(xs, velocity)
        top = torch.finfo(torch.float32).max
        norm = torch.zeros((), dtype=torch.float64, device=wire.device)
        err = torch.zeros((), dtype=torch.float64, device=wire.device)
        for x, residual, out, offset, seed in zip(xs, residuals, residuals_out, offsets, seeds):
            # A payload of a non-finite v (or residual) is not sent: NaN marks it, whatever the norm.
            finite = torch.isfinite(x).all() if residual is None else torch.isfinite(x).all() & torch.isfinite(residual).all()
            enc = self.compress(x, residual, seed=seed, residual_out=out)
            payload = enc.payload.reshape(-1)
            if wire.dtype != payload.dtype:  # a packed (uint8) wire carrying fp32 or fp16 payloads
                payload = payload.view(wire.dtype)
            wire[offset : offset + payload.numel()].copy_(payload)
            norm_t = enc.norm_sq.double().clamp(max=top)
            norm += torch.where(finite, norm_t, torch.full_like(norm_t, float("nan")))
            err += enc.err_sq.double().clamp(max=top)
        return norm, err

    def decode_batch(
        self,
        wires: Sequence[torch.Tensor],
        offsets: Sequence[int],
        outs: Sequence[torch.Tensor],
        seeds: Sequence[int],
    ) -> None:
        """``outs[t] = sum_r decode(wires[r] at offsets[t])`` (fp32, flat; old contents ignored).

        ``seeds[t]`` is tensor ``t``'s decode seed (read only by ``shared_randomness``
        compressors, the same on every rank). Payloads are added in rank order.
        """
        for out, offset, seed in zip(outs, offsets, seeds):
            parts = [self.payload_in(w, offset, out.numel()) for w in wires]
            self.decode_add_many_(parts, out.zero_(), [seed] * len(parts))

    def payload_in(self, wire: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
        """The payload of a ``numel``-element input at ``offset`` of ``wire`` (elements of the wire's dtype)."""
        if wire.dtype == self.payload_dtype:
            return wire[offset : offset + self.payload_numel(numel)]
        return bytes_as(wire[offset : offset + self.payload_nbytes(numel)], self.payload_dtype)

    def server_compress(
        self,
        payloads: Sequence[torch.Tensor],
        seeds: Sequence[int],
        server_error: torch.Tensor,
        server_error_out: torch.Tensor,
        seed: int,
    ) -> Encoded:
        """The two-pass server step: ``w = server_error + sum_r decode(payloads[r])``, encode ``w``
        with ``seed``, and write ``w - C(w)`` into ``server_error_out``."""
        total = self.decode_add_many_(payloads, server_error.clone(), seeds)
        return self.compress(total, None, seed=seed, residual_out=server_error_out)

    @staticmethod
    def _count(numel: int, density: float) -> int:
        """Elements kept by a sparsifier: ``ceil(density * numel)``, at least one."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(density * numel - 1e-9)))

    @staticmethod
    def _generator(seed: int, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen
