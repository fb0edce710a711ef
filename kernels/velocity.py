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

from typing import NamedTuple, Sequence

import torch

from ._dispatch import implementation

__all__ = ["Velocity", "fused_velocity_ok", "velocity", "velocity_many"]


class Velocity(NamedTuple):
    """The optimizer's momentum in front of a multi-tensor op: the op reads ``s_t + residual_t``
    (``s`` as :func:`velocity` defines it from the op's inputs ``x_t``) and writes ``u_out[t]``."""

    p: Sequence[torch.Tensor | None]  # weights, for the weight decay (None: none)
    u_old: Sequence[torch.Tensor | None]  # old velocities (None: the first step)
    u_out: Sequence[torch.Tensor]  # new velocities
    xs: float
    wds: float
    m: float
    a0: float
    a1: float
    c: float
    post: float
    lookahead: bool

    def scalars(self) -> dict:
        return dict(xs=self.xs, wds=self.wds, m=self.m, a0=self.a0, a1=self.a1, c=self.c, post=self.post,
                    lookahead=self.lookahead)  # fmt: skip


def fused_velocity_ok(xs: Sequence[torch.Tensor], spec: Velocity) -> bool:
    """Every input is what a fused CPU op reads in place: contiguous fp32, weights and velocities too."""
    tensors = [*xs, *(t for t in spec.p if t is not None), *(t for t in spec.u_old if t is not None), *spec.u_out]
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def velocity_many(xs: Sequence[torch.Tensor], spec: Velocity) -> list[torch.Tensor]:
    """``s_t`` of every tensor, in new fp32 buffers, with ``spec.u_out`` filled (the unfused path)."""
    out = []
    for t, x in enumerate(xs):
        s = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
        velocity(x, spec.p[t], spec.u_old[t], spec.u_out[t], s, **spec.scalars())
        out.append(s)
    return out


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
    cpu = implementation(u_out) if g.dtype == torch.float32 and g.is_contiguous() else None
    if cpu is None:
        velocity_torch(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead)
        return
    cpu.velocity(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead)
