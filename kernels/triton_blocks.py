"""Tiling, bit packing and payload rows shared by the block-wise Triton kernels.

:mod:`lightning_compress_kernels.triton_sign` and :mod:`lightning_compress_kernels.triton_qsgd` both use these.

Tiling: a program holds a ``(G, CHUNK)`` tile, ``G`` whole blocks of at most ``CHUNK``
elements each (``CHUNK`` = the next power of two >= ``block``, at least 8). Short blocks are
grouped ``G`` to a program so that a program still does a useful amount of work; a block
longer than :data:`MAX_TILE` elements gets a program of its own (``G = 1``) that walks it in
chunks of ``MAX_TILE``. Decode launches use the same tiling, with one program per group of
blocks or per chunk of a long block, so that an element's block is its row (no division).

Payload lists are passed to the kernels as one ``(R, len)`` row-strided tensor
(:func:`payload_rows`): views into one buffer at a constant spacing (the usual layout of an
all-gather output) go in without a copy, anything else is stacked first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._blocks import num_blocks

__all__ = [
    "MAX_TILE", "GROUP_TARGET", "geometry", "warps", "payload_rows", "pack_store", "bit_at", "decode_tile",
    "decode_grid",
]  # fmt: skip

#: Elements of one block a program holds at once; longer blocks are walked in chunks.
MAX_TILE = 4096
#: Elements per program that short blocks are grouped up to.
GROUP_TARGET = 2048


def geometry(n: int, block: int) -> tuple[int, int, int, int, bool]:
    """``(block, nb, G, CHUNK, ONE_PASS)`` for ``n`` elements in blocks of ``block``.

    A single block is given the length ``n`` (its real length) so that block ``0`` covers
    exactly the tensor.
    """
    nb = num_blocks(n, block)
    if nb == 1:
        block = n
    chunk = max(8, triton.next_power_of_2(min(block, MAX_TILE)))
    one_pass = block <= chunk
    group = 1
    if one_pass:
        group = max(1, min(GROUP_TARGET // chunk, triton.next_power_of_2(nb)))
    return block, nb, group, chunk, one_pass


def warps(elements: int) -> int:
    """``num_warps`` of a program holding ``elements`` elements."""
    return 8 if elements >= 4096 else 4


def payload_rows(tensors: Sequence[torch.Tensor], length: int, dtype: torch.dtype, device, name: str):
    """``tensors`` (``R`` 1-D tensors of ``length`` elements) as an ``(R, length)`` tensor with
    unit column stride, and its row stride.

    Views into one storage at a constant non-negative spacing are taken as they are (no copy);
    anything else is stacked.
    """
    for t in tensors:
        if t.dtype != dtype or t.dim() != 1 or t.numel() != length:
            raise ValueError(
                f"`{name}` entries must be 1-D {dtype} tensors of {length} elements; got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"`{name}` entries must be on {device}; got {t.device}")
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        if len(tensors) == 1:
            return first.view(1, length), max(length, 1)
        ptr = first.untyped_storage().data_ptr()
        off = first.storage_offset()
        step = tensors[1].storage_offset() - off
        if step >= 0 and all(
            t.untyped_storage().data_ptr() == ptr and t.storage_offset() == off + r * step
            for r, t in enumerate(tensors)
        ):
            return first.as_strided((len(tensors), length), (step, 1)), step
    return torch.stack([t.contiguous() for t in tensors]), max(length, 1)


@triton.jit
def pack_store(flags, out_ptr, row_start, c0, block, n, G: tl.constexpr, CHUNK: tl.constexpr):
    """Store a ``(G, CHUNK)`` tile of 0/1 int32 flags (zero where masked) as bits, 8 per byte,
    element ``j`` of a byte at bit ``j``; ``row_start + c0`` is a multiple of 8."""
    lanes = tl.reshape(flags, (G, CHUNK // 8, 8))
    shifts = tl.arange(0, 8)
    byte = tl.sum(lanes << shifts[None, None, :], axis=2)
    bcol = tl.arange(0, CHUNK // 8) * 8
    first = row_start[:, None] + c0 + bcol[None, :]  # element index of each byte's bit 0
    ok = (c0 + bcol[None, :] < block) & (first < n)
    tl.store(out_ptr + first // 8, byte.to(tl.uint8), mask=ok)


@triton.jit
def bit_at(packed_ptr, offs, mask):
    """The bit of element ``offs`` in a 1-bit packed tensor, as int32 0/1."""
    byte = tl.load(packed_ptr + offs // 8, mask=mask, other=0).to(tl.int32)
    return (byte >> (offs % 8).to(tl.int32)) & 1


@triton.jit
def decode_tile(pid, chunks, n, nb, block, G: tl.constexpr, CHUNK: tl.constexpr):
    """Rows, offsets and mask of the ``(G, CHUNK)`` tile of program ``pid`` of a decode grid:
    ``chunks`` programs per group of ``G`` blocks, one per ``CHUNK`` elements of a block.
    No per-element division: the block of every element is its row."""
    rows = (pid // chunks).to(tl.int64) * G + tl.arange(0, G)
    c0 = (pid % chunks).to(tl.int64) * CHUNK
    cols = c0 + tl.arange(0, CHUNK)
    offs = rows[:, None] * block + cols[None, :]
    mask = (cols[None, :] < block) & (offs < n)
    return rows, rows < nb, offs, mask


def decode_grid(n: int, block: int):
    """``(grid, block, nb, chunks, G, CHUNK)`` of a decode launch (the encode tiling)."""
    block_k, nb, group, chunk, _ = geometry(n, block)
    chunks = triton.cdiv(block_k, chunk)
    return (triton.cdiv(nb, group) * chunks,), block_k, nb, chunks, group, chunk
