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

* Adam / AdamW with ``adam_step`` (what ``auto`` picks for DoubleSqueeze on 2 ranks, :func:`adam_step_suits`):
  Adam's whole step runs on each rank, on its own gradient, before the exchange::

      u_i = b1 * u_i + (1 - b1) * x_i;   v_i = b2 * v_i + (1 - b2) * x_i**2
      s_i = (b1 * u_i + (1 - b1) * x_i) / (1 - b1**t) / (sqrt(v_i / (1 - b2**t)) + eps / world) / world

  and the optimizer applies ``p -= lr * sum_i s_i`` (after AdamW's ``p *= 1 - lr * weight_decay``).
  Dividing by the second moment *after* a compressor that gives a block one magnitude (``sign``,
  and DoubleSqueeze's second compression of the sum) moves every weight by about ``lr`` at every
  step, noisy ones too; dividing before it keeps Adam's per-weight scale in what is compressed,
  as Efficient-Adam does (Chen, Shen, Huang, Liu, "Quantized Adam with Error Feedback", ACM TIST
  2021: each worker quantizes its Adam step with error feedback, the server quantizes the average
  with error feedback again). Each rank's ``v_i`` (fp32, per parameter) is saved in checkpoints
  with the velocities. The optimizer runs its step with ``lr`` 0 (so its own arithmetic moves
  nothing) and the post-hook applies the exchanged step; gradient clipping between the exchange
  and the step therefore clips Adam's step. Not with a loss scaler (fp16 ``GradScaler``), ``amsgrad``
  or parameters of the optimizer outside the model: ``auto`` keeps ``lookahead`` there.

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

    __slots__ = ("grad", "p", "u_old", "velocity", "scalars", "_s_buffer", "_s", "v_old", "second", "adam")

    def __init__(self, grad, p, u_old, velocity, scalars: dict, s_buffer: torch.Tensor):
        self.grad = grad  # the flat gradient view (any float dtype)
        self.p = p  # fp32 weights for the weight decay, or None
        self.u_old = u_old  # the committed velocity, or None (the first step)
        self.velocity = velocity  # where the new velocity goes (a scratch buffer until committed)
        self.scalars = scalars  # xs, wds, m, a0, a1, c, post, lookahead (kernels.velocity)
        self._s_buffer = s_buffer
        self._s: torch.Tensor | None = None
        # adam_step only: the committed second moment (or None), where the new one goes, and
        # b2, bc2 (1 - b2**t), eps, world, start (the fraction of x**2 an absent second moment
        # starts from: 0 on the first step) and work (a scratch buffer).
        self.v_old: torch.Tensor | None = None
        self.second: torch.Tensor | None = None
        self.adam: dict | None = None

    @property
    def s(self) -> torch.Tensor:
        """``s_i`` (fp32, flat, already divided by the world size); fills ``velocity`` too."""
        if self._s is None:
            velocity(self.grad, self.p, self.u_old, self.velocity, self._s_buffer, **self.scalars)
            if self.adam is not None:
                self._divide_by_second_moment(self._s_buffer)
            self._s = self._s_buffer
        return self._s

    def _divide_by_second_moment(self, s: torch.Tensor) -> None:
        """``adam_step``: update the second moment from this step's ``x_i`` and turn ``s`` into Adam's step.

        In the ``work`` scratch buffer, without temporaries (a fresh tensor of a large parameter's
        size costs its page faults at every step)."""
        a, sc = self.adam, self.scalars
        x = torch.mul(self.grad, sc["xs"], out=a["work"])
        if self.p is not None:
            x.add_(self.p, alpha=sc["wds"])
        v = self.second
        if self.v_old is not None:
            torch.mul(self.v_old, a["b2"], out=v)
        else:  # the first step (start 0), or a run resumed without one: as if x**2 had always been seen
            torch.mul(x, x, out=v).mul_(a["start"] * a["b2"])
        v.addcmul_(x, x, value=1.0 - a["b2"])
        # with x = g / world: s / world / (sqrt(v / bc2) + eps / world) = s / (sqrt(v * world**2 / bc2) + eps)
        denom = torch.mul(v, a["world"] ** 2 / a["bc2"], out=x).sqrt_().add_(a["eps"])
        s.div_(denom)


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        return "adam"
    return None


def resolve_mode(
    mode: str,
    optimizer: torch.optim.Optimizer,
    config: Any = None,
    loss_scaled: bool = False,
    outside: bool = False,
    world: int | None = None,
) -> str:
    """What ``momentum=mode`` does with ``optimizer``: ``lookahead``, ``heavy_ball``, ``adam_step`` or ``optimizer``.

    ``config`` is the exchange's :class:`~lightning_compress.CompressionConfig` and ``world`` its
    number of ranks (``auto`` picks ``adam_step`` for Adam where :func:`adam_step_suits` them),
    ``loss_scaled`` whether a loss scaler (fp16 ``GradScaler``) scales the gradients, ``outside``
    whether the optimizer holds parameters the exchange does not carry; ``adam_step`` needs neither.

    Raises:
        ValueError: the mode moves momentum but the optimizer is not SGD, Adam or AdamW, or its
            groups ask for something the exchange cannot carry (``maximize``; for ``adam_step``
            also ``amsgrad``, a loss scaler, parameters outside the model).
    """
    kind = _kind(optimizer)
    if mode == "auto":
        # SGD with momentum, Adam and AdamW: moved (benchmarks/results/convergence.md); anything else stays.
        moves = kind == "adam" or (kind == "sgd" and any(g.get("momentum", 0) for g in optimizer.param_groups))
        if moves and any(g.get("maximize", False) for g in optimizer.param_groups):
            return "optimizer"
        if not moves:
            return "optimizer"
        suits = adam_step_suits(config, world)
        if kind == "adam" and suits and _adam_step_refusal(optimizer, loss_scaled, outside) is None:
            return "adam_step"
        return "lookahead"
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
    if mode == "adam_step":
        if kind != "adam":
            raise ValueError(
                f"`momentum='adam_step'` runs Adam's step on each rank before the exchange; got "
                f"{type(optimizer).__name__}. Use `momentum='lookahead'` for SGD."
            )
        why = _adam_step_refusal(optimizer, loss_scaled, outside)
        if why is not None:
            raise ValueError(f"`momentum='adam_step'` cannot run with {why}; use `momentum='lookahead'`.")
    return mode


def adam_step_suits(config: Any, world: int | None) -> bool:
    """Whether ``momentum="auto"`` runs Adam's step before the exchange of ``config`` on ``world`` ranks:
    with DoubleSqueeze, whose result (the sum, compressed again) gives a block one magnitude, on 2 ranks.
    On the digits MLP with AdamW (16 seeds) that took the largest gap to dense from epoch 5 from 1.2 to
    0.4 points on 2 ranks, but from 1.1 to 1.4 on 4: ``adam_step`` divides by each rank's own second
    moment, and a rank's gradient is noisier than the average, the more so the more ranks share the
    batch. Elsewhere the look-ahead stays: it already keeps up there (with ``adam_step``, on 2 ranks:
    sign + ef 1.0 to 0.3, but 0.4 to 0.6 on the CNN; top-k 1% + ef 0.6 to 0.8; top-k 1% + EF21 in
    ``benchmarks/momentum_study.py`` 1.2 to 4.0)."""
    return config is not None and config.feedback == "doublesqueeze" and world is not None and world <= 2


def _adam_step_refusal(optimizer: torch.optim.Optimizer, loss_scaled: bool, outside: bool) -> str | None:
    """Why ``adam_step`` cannot run with this Adam, or ``None``."""
    if loss_scaled:
        return "a loss scaler (fp16 GradScaler): the exchanged step would be divided by the loss scale"
    if any(g.get("amsgrad", False) for g in optimizer.param_groups):
        return "`amsgrad=True`"
    if outside:
        return "an optimizer that also holds parameters outside the compressed model"
    return None


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
            lookahead = self.mode in ("lookahead", "adam_step")
        scalars = dict(xs=1.0 / world, wds=wd / world, m=m, a0=a0, a1=a1, c=c, post=post, lookahead=lookahead)
        prepared = Prepared(grad.reshape(-1), p, old, u, scalars, s)
        if self.mode == "adam_step":
            b2 = float(group["betas"][1])
            v_old = state.second_moment.get(name)
            prepared.v_old = v_old if v_old is not None and v_old.numel() == n else None
            prepared.second = state.scratch(name, "second", n, grad.device)
            t = self.steps_taken + 1
            prepared.adam = dict(b2=b2, bc2=1.0 - b2**t, eps=float(group["eps"]), world=float(world),
                                 start=1.0 - b2 ** (t - 1), work=state.scratch(name, "adam_work", n, grad.device))  # fmt: skip
        return prepared

    # ----- the optimizer side -------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._saved = []
        for group in optimizer.param_groups:
            if self.kind == "sgd":
                keep = {k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov") if k in group}
                group.update(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
            else:
                keep = {k: group[k] for k in ("lr", "betas", "weight_decay") if k in group}
                group["betas"] = (0.0, group["betas"][1])
                if not group.get("decoupled_weight_decay", False):
                    group["weight_decay"] = 0.0
                if self.mode == "adam_step":  # the optimizer's arithmetic moves nothing; _after_step steps
                    lr = group["lr"]
                    group["lr"] = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0
            self._saved.append(keep)

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, keep in zip(optimizer.param_groups, self._saved):
            group.update(keep)
        self._saved = []
        self.steps_taken += 1
        if self.mode == "adam_step":
            self._apply_exchanged_step(optimizer)

    @torch.no_grad()
    def _apply_exchanged_step(self, optimizer) -> None:
        """``adam_step``: ``p -= lr * grad``, the gradient being the exchanged Adam step (after AdamW's decay)."""
        for group in optimizer.param_groups:
            lr = float(group["lr"])
            decay = lr * float(group.get("weight_decay", 0.0)) if group.get("decoupled_weight_decay", False) else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if decay:
                    p.mul_(1.0 - decay)
                p.add_(p.grad.to(p.dtype), alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken, "mode": self.mode}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.steps_taken = int(sd.get("steps_taken", 0))


def attach_optimizer(state, optimizer: torch.optim.Optimizer, loss_scaled: bool = False) -> ExchangeMomentum | None:
    """Move ``optimizer``'s momentum into the exchange of ``state`` as ``state.config.momentum`` says.

    Call it once, after :func:`~lightning_compress.register_compression` and before training;
    the Lightning and Fabric strategies and Accelerate's ``enable()`` call it for you. Returns
    the attachment, or ``None`` when the momentum stays in the optimizer. Pass ``loss_scaled=True``
    when a loss scaler (fp16 ``GradScaler``) scales the gradients: ``adam_step`` cannot run then,
    and ``auto`` keeps ``lookahead`` (the integrations pass it themselves).

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
    own = set(state.param_names)
    outside = any(id(p) not in own for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
    mode = resolve_mode(state.config.momentum, optimizer, state.config, loss_scaled, outside, state.world_size)
    if mode == "optimizer":
        return None
    attached = ExchangeMomentum(state, optimizer, mode)
    state.attach_momentum(attached)
    if state.rank == 0:
        log.info("lightning_compress: %s momentum moved into the exchange (%s)", type(optimizer).__name__, mode)
    return attached
