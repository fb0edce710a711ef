"""GraVAC in the DDP hook: per-step gains at two compression factors, and the CF decision.

The decision logic is :class:`~lightning_compress.gravac.GraVACController`; this module is
what runs it inside the exchange. Each step, for every compressible tensor, on the
error-compensated gradient ``g = x + e``:

1. ``g_min = C(g, theta_min)`` and the candidate ``g_c = C(g_min, CF_c)``, a second compression
   of the already compressed tensor (multi-level compression), with their errors;
2. the tensor that the controller's plan names (decided before the step, identical on every
   rank) is sent: the candidate, ``g_min``, or ``g`` itself densely; the residual becomes
   ``g`` minus what was sent (zero after a dense step);
3. after the last bucket, one ``all_gather`` of four numbers per rank (errors at both levels,
   ``||g||^2``, iteration time) gives every rank the same gains ``1 - sum err / sum ||g||^2``
   and the slowest rank's iteration time, which the controller observes.

Gains are those of the whole model (all compressed tensors together), as in the paper.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lightning_compress.compressors import COMPRESSORS, Compressor
from lightning_compress.config import CompressionConfig
from lightning_compress.gravac import GraVACController, Plan
from lightning_compress.transport import send_encoded
from lightning_compress_kernels.finite import all_finite

__all__ = ["AdaptiveRun", "ADAPTIVE_COMPRESSORS", "compressor_at", "qsgd_ladder", "attach_gravac"]

ADAPTIVE_COMPRESSORS = ("topk", "dgc", "qsgd")
_FP32_MAX = torch.finfo(torch.float32).max
_QSGD_BITS = (8, 4, 2, 1)


def compressor_at(config: CompressionConfig, cf: float) -> Compressor:
    """``config``'s compressor at compression factor ``cf``: top-k/DGC at density ``1 / cf``, QSGD at the
    bit width whose factor is closest.

    Built directly, not through a :class:`CompressionConfig`: these levels are GraVAC's own, its error
    feedback is applied outside them, and the pairing advice a config gives a user does not apply.
    """
    if config.compressor == "qsgd":
        bits = min(_QSGD_BITS, key=lambda b: abs(32.0 / (b + 1) - cf))
        density = config.density
    else:
        bits, density = config.bits, min(1.0, 1.0 / cf)
    return COMPRESSORS[config.compressor](
        density=density, bits=bits, block_size=config.block_size_resolved, sample_fraction=config.dgc_sample_fraction
    )


def qsgd_ladder() -> list[float]:
    """CFs of QSGD at 8, 4, 2 and 1 bits (``bits + 1`` bits per element against 32)."""
    return [32.0 / (b + 1) for b in _QSGD_BITS]


def gravac_config_problem(cfg: CompressionConfig) -> str | None:
    """Why GraVAC cannot run with ``cfg``, or ``None``: the one rule the state, the Lightning callback and
    Accelerate's launcher check."""
    if cfg.hierarchical:
        return (
            "GraVAC picks one compression factor for the flat exchange and keeps its own error feedback; it does "
            "not run with `hierarchical=True`. Use `hierarchical=False` with GraVAC, or a fixed compressor."
        )
    if cfg.density_warmup_steps:
        return (
            "GraVAC chooses the compression factor from the first step; it does not run with a density warm-up "
            f"(`density_warmup_steps={cfg.density_warmup_steps}`). Set `density_warmup_steps=0` with GraVAC."
        )
    if cfg.compressor not in ADAPTIVE_COMPRESSORS:
        return f"GraVAC adapts the compression factor of {ADAPTIVE_COMPRESSORS}; the compressor is {cfg.compressor!r}"
    if cfg.feedback != "ef":
        return (
            "GraVAC keeps its own error feedback (residual = g - sent, cleared after a dense step); "
            f"use feedback='ef', not {cfg.feedback!r}"
        )
    if cfg.transport == "two_pass":
        return "GraVAC sends through allgather or allreduce, not transport='two_pass'"
    return None


class AdaptiveRun:
    """A controller attached to one :class:`~lightning_compress.state.CompressionState`."""

    def __init__(self, controller: GraVACController, state):
        cfg = state.config
        problem = gravac_config_problem(cfg)
        if problem is not None:
            raise ValueError(problem)
        if state.transport == "two_pass":  # transport='auto' chose it (an explicit two_pass is refused above)
            state.transport = cfg.transport_for(state.world_size, adaptive=True)
        self.controller = controller
        self.samples_per_step = float(state.world_size)  # world x batch; integrations set the batch
        self._base = cfg
        self._compressors: dict[float, Compressor] = {}
        self._plan: Plan | None = None
        self._plan_step = -1
        self._last_finish: float | None = None
        self._step_begin: float | None = None
        self._reset()
        self.bucket_err = self.bucket_norm = 0.0
        self.last: dict[str, Any] = {}  # what the last observed step did, for loggers

    def _reset(self) -> None:
        self._err_min = self._err_cand = self._norm = 0.0
        self._used = False
        self._skip = False

    def skip_step(self) -> None:
        """Some rank held inf/NaN (every rank learns it together): this step is not observed."""
        self._skip = True

    def compressor(self, cf: float) -> Compressor:
        """The configured compressor at compression factor ``cf``."""
        comp = self._compressors.get(cf)
        if comp is None:
            comp = self._compressors[cf] = compressor_at(self._base, cf)
        return comp

    def plan(self, step: int) -> Plan:
        """The plan of step ``step`` (fixed at its first bucket)."""
        if self._plan_step != step:
            self._plan, self._plan_step = self.controller.plan(), step
            self._step_begin = time.perf_counter()
        return self._plan

    # ----- the exchange of one bucket -------------------------------------------------------
    def exchange(self, state, names, xs, local_finite: bool):
        """Compress, send and aggregate one bucket's tensors; returns aggregates or ``None`` (inf/NaN)."""
        plan = self.plan(state.step)
        mems = [state.memory_for(name, x.numel(), x.device) for name, x in zip(names, xs)]
        gs = [torch.add(x, mem["residual"], out=state.scratch(name, "g", x.numel(), x.device))
              for name, x, mem in zip(names, xs, mems)]  # fmt: skip
        if plan.send_cf is None:
            flat = torch.cat(gs)
            state.collectives.allreduce_(flat)
            if not all_finite(flat):
                return None
            aggregates = list(torch.split(flat, [g.numel() for g in gs]))
            residuals = [None] * len(gs)
            _, _, (_, _, norm) = self._observe_levels(state, names, gs, plan, send=False)
            self.bucket_err, self.bucket_norm = 0.0, norm
        else:
            encoded, residuals, (err_min, err_cand, norm) = self._observe_levels(state, names, gs, plan, send=True)
            comp = self.compressor(plan.send_cf)
            seeds = [self._seed(state, n, plan.send_cf == plan.candidate_cf) for n in names]
            aggregates = [state.scratch(n, "agg", g.numel(), g.device) for n, g in zip(names, gs)]
            payloads = [enc.payload for enc in encoded]
            # A NaN sum: some value, or a block norm a payload carries, is not finite (see Compressor.compress).
            sendable = local_finite and not any(math.isnan(v) for v in (err_min, err_cand, norm))
            if not send_encoded(state.transport, state.collectives, comp, payloads, aggregates, seeds, sendable):
                return None
            self.bucket_err = err_cand if plan.send_cf == plan.candidate_cf else err_min
            self.bucket_norm = norm
        for mem, res in zip(mems, residuals):
            if res is None:
                mem["residual"].zero_()
            else:
                mem["residual"].copy_(res)
        return aggregates

    @staticmethod
    def _seed(state, name: str, candidate: bool) -> int:
        pick = state.seed if state.compressor.shared_randomness else state.rank_seed
        return pick(name, 1 if candidate else 0)

    def _observe_levels(self, state, names, gs, plan: Plan, send: bool):
        """Compress at both levels; the payloads and residuals to send, and this bucket's
        ``(err_min, err_candidate, ||g||^2)``, which also go into the step's totals."""
        cmin, ccand = self.compressor(plan.min_cf), self.compressor(plan.candidate_cf)
        encoded, residuals = [], []
        err_min_sum = err_cand_sum = norm_sum = 0.0
        for name, g in zip(names, gs):
            err_min = state.scratch(name, "err_min", g.numel(), g.device)
            enc_min = cmin.compress(g, seed=self._seed(state, name, False), residual_out=err_min)
            d_min = torch.sub(g, err_min, out=state.scratch(name, "d_min", g.numel(), g.device))
            err_c = state.scratch(name, "err_c", g.numel(), g.device)
            enc_c = ccand.compress(d_min, seed=self._seed(state, name, True), residual_out=err_c)
            total_c = err_c.add_(err_min)  # g - C(g_min) = (g - g_min) + (g_min - C(g_min))
            # Squares of huge finite values overflow fp32: saturate, as the compressors' own sums do (NaN stays).
            norm_sum += min(float(enc_min.norm_sq), _FP32_MAX)
            err_min_sum += min(float(enc_min.err_sq), _FP32_MAX)
            err_cand_sum += min(float(torch.dot(total_c, total_c)), _FP32_MAX)
            if send:
                if plan.send_cf == plan.candidate_cf:
                    encoded.append(enc_c)
                    residuals.append(total_c)
                else:
                    encoded.append(enc_min)
                    residuals.append(err_min)
        self._norm += norm_sum
        self._err_min += err_min_sum
        self._err_cand += err_cand_sum
        self._used = True
        return encoded, residuals, (err_min_sum, err_cand_sum, norm_sum)

    # ----- end of step ----------------------------------------------------------------------
    def finish_step(self, state) -> None:
        """Combine this step's numbers over ranks (one small all_gather) and let the controller observe."""
        if not self._used or self._skip:
            self._reset()
            return
        now = time.perf_counter()
        start = self._last_finish if self._last_finish is not None else self._step_begin
        self._last_finish = now
        local = torch.tensor([self._err_min, self._err_cand, self._norm, now - start], dtype=torch.float64)
        gathered = torch.stack(state.collectives.all_gather(local))
        err_min, err_cand, norm = (float(v) for v in gathered[:, :3].sum(dim=0))
        iteration_time = max(float(gathered[:, 3].max()), 1e-9)
        plan = self._plan
        gain_min = 1.0 - err_min / norm if norm > 0 else 1.0
        gain_cand = 1.0 - err_cand / norm if norm > 0 else 1.0
        self.controller.observe(gain_min, gain_cand, iteration_time, self.samples_per_step)
        sent = "dense" if plan.send_cf is None else "candidate" if plan.send_cf == plan.candidate_cf else "min"
        self.last = {
            "cf": plan.send_cf if plan.send_cf is not None else 1.0,
            "gain": {"dense": 1.0, "candidate": gain_cand, "min": gain_min}[sent],
            "gain_min": gain_min,
            "gain_candidate": gain_cand,
            "iteration_time": iteration_time,
            "throughput": self.samples_per_step / iteration_time,
            "theta_min": plan.min_cf,
            "candidate_cf": plan.candidate_cf,
        }
        self._reset()


def attach_gravac(state, controller: GraVACController | None = None, **kwargs) -> AdaptiveRun:
    """Run GraVAC on ``state`` (a registered :class:`CompressionState`); returns the attachment.

    ``kwargs`` go to :class:`GraVACController` when no ``controller`` is given; ``world_size``
    and, for ``qsgd``, the bit-width ``ladder`` are filled in.
    """
    if controller is None:
        kwargs.setdefault("world_size", state.world_size)
        if state.config.compressor == "qsgd":
            kwargs.setdefault("ladder", qsgd_ladder())
        controller = GraVACController(**kwargs)
    run = AdaptiveRun(controller, state)
    state.attach_adaptive(run)  # with the controller state a checkpoint loaded before it existed
    return run
