"""The optimizer's momentum in front of the compressor: one pass per tensor.

Meaning (the torch twin is the reference), elementwise, every product rounded before the sum
it enters (no fused multiply-add, so every path gives the same bits)::

    x = g * xs  (+ p * wds)                       # this rank's share, with weight decay
    u = x * a0              (no old velocity)      # the first step
      = u_old * m + x * a1  (otherwise)
    s = (u * m + x * c if lookahead else u) * post

SGD (momentum m, dampening d): ``a0 = 1, a1 = 1 - d, c = 1, post = 1``; Adam (b1):
``m = b1, a0 = a1 = c = 1 - b1`` and ``post`` its bias correction. ``u_out`` and ``s_out`` get
``u`` and ``s``; ``g`` is any float dtype (read as fp32), the rest fp32, all flat and contiguous.
"""

from __future__ import annotations

import torch

from kernels._dispatch import path_for

__all__ = ["velocity"]


def velocity_torch(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead) -> None:
    x = g.to(torch.float32) * xs
    if p is not None:
        x = x + p * wds
    if u_old is None:
        torch.mul(x, a0, out=u_out)
    else:
        torch.add(u_old * m, x * a1, out=u_out)
    if lookahead:
        torch.add(u_out * m, x * c, out=s_out)
    else:
        s_out.copy_(u_out)
    if post != 1.0:
        s_out.mul_(post)


def velocity(
    g: torch.Tensor,
    p: torch.Tensor | None,
    u_old: torch.Tensor | None,
    u_out: torch.Tensor,
    s_out: torch.Tensor,
    *,
    xs: float,
    wds: float = 0.0,
    m: float,
    a0: float,
    a1: float,
    c: float,
    post: float = 1.0,
    lookahead: bool,
) -> None:
    """``u_out`` and ``s_out`` as the module doc defines them (``p``: ``None`` without weight decay)."""
    n = g.numel()
    for t, name in ((p, "p"), (u_old, "u_old"), (u_out, "u_out"), (s_out, "s_out")):
        if t is not None and (t.numel() != n or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"`{name}` must be a contiguous fp32 tensor of {n} elements; got {t.dtype} {t.numel()}")
    if g.dtype == torch.float32 and g.is_contiguous() and path_for(u_out) == "cpu":
        from kernels import cpu

        cpu.velocity(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead)
        return
    velocity_torch(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead)
