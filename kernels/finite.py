"""Whether a tensor holds only finite values: the inf/NaN check of every exchanged bucket.

Meaning (the twin): ``bool(torch.isfinite(x).all())``. The CPU path reads fp32 bits once (an
element is non-finite when its exponent bits are all ones) and allocates nothing; other
dtypes and devices use the twin.
"""

from __future__ import annotations

import torch

from ._dispatch import implementation

__all__ = ["all_finite"]


def all_finite_torch(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def all_finite(x: torch.Tensor) -> bool:
    """No inf or NaN in ``x`` (any shape and dtype)."""
    if x.numel() == 0:
        return True
    cpu = implementation(x) if x.dtype == torch.float32 and x.is_contiguous() else None
    if cpu is None:
        return all_finite_torch(x)
    return cpu.all_finite(x.reshape(-1))
