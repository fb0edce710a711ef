"""Block geometry shared by the block-wise ops."""

from __future__ import annotations

import torch

__all__ = ["num_blocks", "as_blocks", "block_lengths", "byte_aligned"]


def num_blocks(numel: int, block: int) -> int:
    """Blocks of ``block`` elements needed to cover ``numel`` (the last may be shorter)."""
    return -(-numel // block)


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View ``x`` as ``(num_blocks, block)``, zero-padding the last block."""
    pad = num_blocks(x.numel(), block) * block - x.numel()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block)


def block_lengths(numel: int, block: int, device: torch.device) -> torch.Tensor:
    """fp32 length of every block."""
    lengths = torch.full((num_blocks(numel, block),), float(block), device=device)
    if numel % block:
        lengths[-1] = numel % block
    return lengths


def byte_aligned(numel: int, block: int, bits: int = 1) -> bool:
    """Every block starts on a byte of the packed codes, so blocks can be packed independently."""
    return num_blocks(numel, block) <= 1 or (block * bits) % 8 == 0
