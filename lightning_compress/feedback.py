"""Error compensation: the memory each rank keeps between steps, per parameter.

All vectors are flat fp32 and in units of one rank's share of the average, i.e.
``x_i = grad_i / world_size``, so that the sum over ranks is the averaged gradient.
One step for a parameter is::

    xin, res = scheme.compress_args(x, mem)    # this rank encodes v = xin + res
    p, err = compressor.compress(xin, res)     # err = v - C(v), this rank's compression error
    new_local = scheme.worker_update(v, err, mem)
    agg = sum over ranks of decode(p_j)        # the transport's job
    out, new_shared = scheme.result(agg, mem)  # what goes back into the gradient

Error feedback hands ``(x, e)`` to the compressor, so a fused kernel reads ``x`` and ``e``
once and writes the payload and the new residual without materializing ``v``.

Memory is only written after the exchange succeeded (see the hook), so the
methods return new tensors instead of updating ``mem`` in place.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lightning_compress.compressors import Compressor

__all__ = ["Feedback", "NoFeedback", "ErrorFeedback", "EF21", "DIANA", "DoubleSqueeze", "make_feedback"]

Memory = dict[str, torch.Tensor]


class Feedback:
    """No memory: plain compressed SGD, ``out = sum_i C(x_i)``."""

    name: ClassVar[str] = "none"
    memory_keys: ClassVar[tuple[str, ...]] = ()
    #: keys holding the same value on every rank (updated from the aggregate only)
    shared_keys: ClassVar[tuple[str, ...]] = ()
    #: ``v = x + memory[memory_keys[0]]`` (or ``x`` without memory): the compressor reads both in
    #: its fused pass; otherwise ``v = x - shift(memory)`` is formed first
    fused_residual: ClassVar[bool] = True
    #: the sum over ranks of the decoded payloads is the result itself (``result`` is the identity)
    direct_result: ClassVar[bool] = True

    def shift(self, mem: Memory) -> torch.Tensor:
        """What ``v = x - shift`` subtracts, for schemes without a fused residual."""
        raise NotImplementedError

    def initial_memory(self, x: torch.Tensor, average: torch.Tensor) -> Memory | None:
        """Memory to start from, set by one dense exchange (``x``: this rank's share, ``average``: the
        sum over ranks); ``None``: start from zeros without one."""
        return None

    def compress_input(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        """``v``, the tensor this rank compresses."""
        return x

    def compress_args(self, x: torch.Tensor, mem: Memory) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(xin, res)`` with ``xin + res == v``, as :meth:`Compressor.compress` takes them."""
        return self.compress_input(x, mem), None

    def worker_update(self, v: torch.Tensor, error: torch.Tensor, mem: Memory) -> Memory:
        """New local memory from ``v`` and this rank's compression error ``v - C(v)``."""
        return {}

    def result(self, aggregate: torch.Tensor, mem: Memory) -> tuple[torch.Tensor, Memory]:
        return aggregate, {}

    def commit(self, aggregate: torch.Tensor, v: torch.Tensor, error: torch.Tensor, mem: Memory) -> torch.Tensor:
        """After a successful exchange: move ``mem`` in place and return what goes into the gradient.

        The same numbers as :meth:`result` and :meth:`worker_update`, without new tensors;
        ``aggregate``, ``v`` and ``error`` are scratch buffers it may overwrite.
        """
        out, shared = self.result(aggregate, mem)
        mem.update(self.worker_update(v, error, mem))
        mem.update(shared)
        return out


NoFeedback = Feedback


class ErrorFeedback(Feedback):
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019): ``v = x + e; e = v - C(v)``."""

    name = "ef"
    memory_keys = ("residual",)

    def compress_input(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        return x + mem["residual"]

    def compress_args(self, x: torch.Tensor, mem: Memory) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, mem["residual"]

    def worker_update(self, v: torch.Tensor, error: torch.Tensor, mem: Memory) -> Memory:
        return {"residual": error}


class DoubleSqueeze(ErrorFeedback):
    """DoubleSqueeze (Tang et al., ICML 2019): worker error as in EF, plus a server error.

    The server side (compress the aggregated shard plus its error) lives in the two-pass
    transport, which keeps the server error per parameter shard.
    """

    name = "doublesqueeze"


class EF21(Feedback):
    """EF21 (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021).

    Each rank keeps ``g_i`` (``local``) and sends ``c_i = C(x_i - g_i)``, then
    ``g_i += step * c_i``; every rank keeps ``g = sum_i g_i`` (``global``) and moves it by
    ``step * sum_i c_i``. As in the paper, ``g_i`` starts at the first local gradient (one dense
    exchange), not at zero. ``step`` 1 is the paper's EF21. Any ``step`` in (0, 2) is EF21 with the
    compressor ``step * C``, which is contractive whenever ``C`` is:
    ``||x - step C(x)||^2 = ||x||^2 - (1 - (1 - step)^2) ||C(x)||^2`` for top-k-like ``C``.
    """

    name = "ef21"
    memory_keys = ("local", "global")
    shared_keys = ("global",)
    fused_residual = False
    direct_result = False

    def __init__(self, step: float = 1.0):
        self.step = step

    def shift(self, mem: Memory) -> torch.Tensor:
        return mem["local"]

    def initial_memory(self, x: torch.Tensor, average: torch.Tensor) -> Memory:
        # The paper's start: g_i = x_i and g = sum_i g_i, from one dense exchange.
        return {"local": x.clone(), "global": average.clone()}

    def compress_input(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        return x - mem["local"]

    def worker_update(self, v: torch.Tensor, error: torch.Tensor, mem: Memory) -> Memory:
        return {"local": mem["local"] + self.step * (v - error)}

    def result(self, aggregate: torch.Tensor, mem: Memory) -> tuple[torch.Tensor, Memory]:
        out = mem["global"] + self.step * aggregate
        return out, {"global": out}

    def commit(self, aggregate, v, error, mem) -> torch.Tensor:
        message = torch.sub(v, error, out=error)  # C(v_i), what this rank sent
        mem["local"].add_(message, alpha=self.step)
        return mem["global"].add_(aggregate, alpha=self.step)


class DIANA(Feedback):
    """DIANA / shifted compression (Mishchenko et al. 2019; Shulgin and Richtarik, UAI 2022).

    ``g_hat_i = h_i + Q(x_i - h_i)`` and ``h_i += alpha * Q(x_i - h_i)``; every rank keeps
    ``H = sum_i h_i`` (``global_shift``) so that ``out = H + sum_i Q(x_i - h_i)``. The shifts
    start at the first local gradients (one dense exchange), not at zero.
    """

    name = "diana"
    memory_keys = ("shift", "global_shift")
    shared_keys = ("global_shift",)
    fused_residual = False
    direct_result = False

    def shift(self, mem: Memory) -> torch.Tensor:
        return mem["shift"]

    def initial_memory(self, x: torch.Tensor, average: torch.Tensor) -> Memory:
        # Shifts start at the local gradients (h_i = x_i, H = sum_i h_i), from one dense exchange.
        return {"shift": x.clone(), "global_shift": average.clone()}

    def __init__(self, compressor: Compressor, alpha: float | None = None):
        self.compressor = compressor
        self.fixed_alpha = alpha

    def alpha(self, numel: int) -> float:
        """The shift step: the configured one, else ``1 / (omega + 1)`` for this tensor size."""
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return 1.0 / (self.compressor.omega(numel) + 1.0)

    def compress_input(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        return x - mem["shift"]

    def worker_update(self, v: torch.Tensor, error: torch.Tensor, mem: Memory) -> Memory:
        return {"shift": mem["shift"] + self.alpha(v.numel()) * (v - error)}

    def result(self, aggregate: torch.Tensor, mem: Memory) -> tuple[torch.Tensor, Memory]:
        step = self.alpha(aggregate.numel())
        return mem["global_shift"] + aggregate, {"global_shift": mem["global_shift"] + step * aggregate}

    def commit(self, aggregate, v, error, mem) -> torch.Tensor:
        step = self.alpha(aggregate.numel())
        message = torch.sub(v, error, out=error).mul_(step)  # alpha * Q(x_i - h_i)
        mem["shift"].add_(message)
        out = torch.add(mem["global_shift"], aggregate, out=v)
        mem["global_shift"].add_(aggregate.mul_(step))
        return out


def make_feedback(
    name: str, compressor: Compressor, *, diana_alpha: float | None = None, ef21_step: float = 1.0
) -> Feedback:
    """The scheme called ``name``; DIANA's step is ``diana_alpha`` or ``1 / (omega + 1)``, EF21's ``ef21_step``."""
    if name == "none":
        return Feedback()
    if name == "ef":
        return ErrorFeedback()
    if name == "doublesqueeze":
        return DoubleSqueeze()
    if name == "ef21":
        return EF21(ef21_step)
    if name == "diana":
        return DIANA(compressor, diana_alpha)
    raise ValueError(f"`feedback` must be one of ('none', 'ef', 'ef21', 'diana', 'doublesqueeze'); got {name!r}")
