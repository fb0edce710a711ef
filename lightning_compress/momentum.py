"""The optimizer's momentum, moved into the compressed exchange.

Momentum applied *after* compression amplifies the bursts that error feedback releases late,
so compressed training with SGD + momentum needs several times the steps early on. DGC's
momentum correction (Lin et al., ICLR 2018) moves the momentum in front of the compressor:
each rank keeps its own velocity of its share of the gradient and compresses that. Sending
the Nesterov look-ahead of it converged fastest in ``benchmarks/momentum_study.py``.

Per parameter, with ``x_i = grad_i / world`` on rank ``i`` and the optimizer's settings read
from the parameter's group at every step (so schedules of ``momentum`` or ``betas`` apply):

* SGD (``momentum`` m, ``dampening`` d, ``weight_decay`` wd)::

      x_i += wd * p / world                        # weight decay travels with the gradient
      u_i  = m * u_i + (1 - d) * x_i               # torch's convention: u_i = x_i on the first step
      s_i  = x_i + m * u_i  (lookahead, or the optimizer's nesterov)   |   u_i  (heavy_ball)

  The exchange sends ``s_i`` through the feedback scheme as it sends ``x_i`` otherwise, so
  the averaged result is ``sum_i s_i`` (exactly the optimizer's update direction when nothing
  is compressed); the optimizer steps with momentum, dampening and weight decay 0.
* Adam / AdamW (``betas`` (b1, b2))::

      u_i = b1 * u_i + (1 - b1) * x_i;   s_i = b1 * u_i + (1 - b1) * x_i  (lookahead)  |  u_i

  each rank sends ``s_i / (1 - b1**t)`` (``t``: the optimizer steps that ran, this one
  included) and the optimizer steps with betas ``(0, b2)`` on the sum, so its second moment
  follows the exchanged first moment (Adam's L2 ``weight_decay`` travels with the gradient;
  AdamW's decoupled one stays in the optimizer).

The optimizer's own settings are zeroed by a step pre-hook and restored by a post-hook, so
outside ``step()`` (in its ``state_dict``, for schedulers) it holds the user's values; a
backward pass inside ``step()`` (a closure, as Lightning runs it) reads the values set aside. The
velocities ``u_i`` are per rank, fp32, keyed by parameter name, committed only when the
bucket's exchange succeeded, rescaled with the loss scale and saved in checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lightning_compress_kernels.velocity import velocity

__all__ = ["ExchangeMomentum", "attach_optimizer"]

log = logging.getLogger(__name__)


class Prepared:
    """One parameter's input to the exchange, ``s_i``, and the velocity to commit after it.

    ``s`` is computed when first read; a compressor that fuses the velocity into its own pass
    reads ``grad``, ``p``, ``u_old`` and ``scalars`` instead and writes ``velocity`` itself.
    """

    __slots__ = ("grad", "p", "u_old", "velocity", "scalars", "_s_buffer", "_s")

    def __init__(self, grad, p, u_old, velocity, scalars: dict, s_buffer: torch.Tensor):
        self.grad = grad  # the flat gradient view (any float dtype)
        self.p = p  # fp32 weights for the weight decay, or None
        self.u_old = u_old  # the committed velocity, or None (the first step)
        self.velocity = velocity  # where the new velocity goes (a scratch buffer until committed)
        self.scalars = scalars  # xs, wds, m, a0, a1, c, post, lookahead (kernels.velocity)
        self._s_buffer = s_buffer
        self._s: torch.Tensor | None = None

    @property
    def s(self) -> torch.Tensor:
        """``s_i`` (fp32, flat, already divided by the world size); fills ``velocity`` too."""
        if self._s is None:
            velocity(self.grad, self.p, self.u_old, self.velocity, self._s_buffer, **self.scalars)
            self._s = self._s_buffer
        return self._s


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        return "adam"
    return None


def resolve_mode(mode: str, optimizer: torch.optim.Optimizer) -> str:
    """What ``momentum=mode`` does with ``optimizer``: ``lookahead``, ``heavy_ball`` or ``optimizer``.

    Raises:
        ValueError: the mode moves momentum but the optimizer is not SGD, Adam or AdamW, or its
            groups ask for something the exchange cannot carry (``maximize``).
    """
    kind = _kind(optimizer)
    if mode == "auto":
        # SGD with momentum, Adam and AdamW: moved (benchmarks/results/convergence.md); anything else stays.
        moves = kind == "adam" or (kind == "sgd" and any(g.get("momentum", 0) for g in optimizer.param_groups))
        if moves and any(g.get("maximize", False) for g in optimizer.param_groups):
            return "optimizer"
        return "lookahead" if moves else "optimizer"
    if mode == "optimizer":
        return mode
    if kind is None:
        raise ValueError(
            f"`momentum={mode!r}` moves the optimizer's momentum into the exchange, which works for "
            f"torch.optim.SGD, Adam and AdamW; got {type(optimizer).__name__}. Use `momentum='optimizer'`."
        )
    if any(g.get("maximize", False) for g in optimizer.param_groups):
        raise ValueError(f"`momentum={mode!r}` cannot move the momentum of a `maximize=True` optimizer; "
                         "use `momentum='optimizer'`.")  # fmt: skip
    return mode


class ExchangeMomentum:
    """An optimizer whose momentum (and coupled weight decay) runs inside the exchange of ``state``."""

    def __init__(self, state, optimizer: torch.optim.Optimizer, mode: str):
        self.kind = _kind(optimizer)
        self.mode = mode
        self.optimizer = optimizer
        self.steps_taken = 0  # optimizer steps that ran (a GradScaler may skip some): Adam's bias correction
        # Group *indices*: load_state_dict replaces the group dicts, but keeps their order.
        self._group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._saved: list[dict[str, Any]] = []  # the user's settings, set aside while step() runs
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def detach(self) -> None:
        """Give the optimizer its momentum back (the hook then sends plain gradients)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ----- the exchange side (hook thread) ----------------------------------------------------
    def _settings(self, param: torch.Tensor) -> dict[str, Any] | None:
        """The user's settings of ``param``'s group. Inside ``step()`` (a closure runs the backward pass
        there, as Lightning does) they are the ones the pre-hook set aside, not the zeroed ones."""
        index = self._group_of.get(id(param))
        if index is None:
            return None
        group = self.optimizer.param_groups[index]
        return {**group, **self._saved[index]} if self._saved else group

    def manages(self, param: torch.Tensor) -> bool:
        group = self._settings(param)
        if group is None:
            return False
        return self.kind == "adam" or group.get("momentum", 0) != 0

    def prepare(self, state, name: str, param: torch.Tensor, grad: torch.Tensor, world: int) -> Prepared:
        """``s_i`` for one parameter's gradient view (fp32 scratch) and the velocity to commit."""
        group = self._settings(param)
        n = grad.numel()
        coupled_decay = self.kind == "sgd" or not group.get("decoupled_weight_decay", False)
        wd = float(group.get("weight_decay", 0.0)) if coupled_decay else 0.0
        p = param.detach().reshape(-1).to(torch.float32).contiguous() if wd else None
        old = state.velocity.get(name)
        if old is not None and old.numel() != n:
            old = None
        u = state.scratch(name, "velocity", n, grad.device)
        s = state.scratch(name, "s", n, grad.device)
        if self.kind == "sgd":
            m = float(group["momentum"])
            a0, a1, c, post = 1.0, 1.0 - float(group.get("dampening", 0.0)), 1.0, 1.0
            lookahead = self.mode == "lookahead" or bool(group.get("nesterov", False))
        else:
            m = float(group["betas"][0])
            a0 = a1 = c = 1.0 - m
            post = 1.0 / (1.0 - m ** (self.steps_taken + 1))  # Adam's bias correction for this step
            lookahead = self.mode == "lookahead"
        scalars = dict(xs=1.0 / world, wds=wd / world, m=m, a0=a0, a1=a1, c=c, post=post, lookahead=lookahead)
        return Prepared(grad.reshape(-1), p, old, u, scalars, s)

    # ----- the optimizer side -------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._saved = []
        for group in optimizer.param_groups:
            if self.kind == "sgd":
                keep = {k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov") if k in group}
                group.update(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
            else:
                keep = {k: group[k] for k in ("betas", "weight_decay") if k in group}
                group["betas"] = (0.0, group["betas"][1])
                if not group.get("decoupled_weight_decay", False):
                    group["weight_decay"] = 0.0
            self._saved.append(keep)

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, keep in zip(optimizer.param_groups, self._saved):
            group.update(keep)
        self._saved = []
        self.steps_taken += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken, "mode": self.mode}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.steps_taken = int(sd.get("steps_taken", 0))


def attach_optimizer(state, optimizer: torch.optim.Optimizer) -> ExchangeMomentum | None:
    """Move ``optimizer``'s momentum into the exchange of ``state`` as ``state.config.momentum`` says.

    Call it once, after :func:`~lightning_compress.register_compression` and before training;
    the Lightning and Fabric strategies and Accelerate's ``enable()`` call it for you. Returns
    the attachment, or ``None`` when the momentum stays in the optimizer.

    Raises:
        ValueError: the mode needs an optimizer this cannot handle (see :func:`resolve_mode`).
        RuntimeError: an optimizer is already attached to ``state``.

    Example (plain DDP)::

        state = register_compression(ddp, "compressor=sign,feedback=ef")
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        attach_optimizer(state, opt)  # the exchange now carries the momentum; train as usual
    """
    if state.momentum is not None:
        raise RuntimeError("an optimizer's momentum is already moved into this exchange; attach one optimizer")
    mode = resolve_mode(state.config.momentum, optimizer)
    if mode == "optimizer":
        return None
    attached = ExchangeMomentum(state, optimizer, mode)
    state.attach_momentum(attached)
    if state.rank == 0:
        log.info("lightning_compress: %s momentum moved into the exchange (%s)", type(optimizer).__name__, mode)
    return attached
