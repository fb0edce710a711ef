"""``CompressionState``: config, per-rank memory, step counter and statistics of one DDP model."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from lightning_compress.config import CompressionConfig
from lightning_compress.exchange import StepPipeline
from lightning_compress.feedback import make_feedback
from lightning_compress.transport import Collectives

__all__ = ["CompressionState", "CompressionStats", "mix_seed"]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained), identical in every process."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


@dataclass
class CompressionStats:
    """What the exchange cost, for the last finished step and since registration.

    ``bytes_*`` count what was handed to collectives; ``dense_bytes_*`` what a dense DDP
    allreduce of the same buckets would have been handed; ``sent_bytes_*`` estimate what
    this rank transmitted (see :class:`~lightning_compress.transport.Collectives`).
    ``gain`` is ``1 - ||C(v) - v||^2 / ||v||^2`` over the compressed tensors of the last step.
    """

    steps: int = 0
    bytes_last_step: int = 0
    dense_bytes_last_step: int = 0
    sent_bytes_last_step: float = 0.0
    bytes_total: int = 0
    dense_bytes_total: int = 0
    sent_bytes_total: float = 0.0
    gain: float = 1.0
    compressed_last_step: bool = False
    buckets_last_step: int = 0
    #: seconds of the last step spent compressing and launching on the hook's thread, decoding
    #: in completion callbacks, and blocked waiting for collectives (second passes, the drain)
    encode_seconds_last_step: float = 0.0
    decode_seconds_last_step: float = 0.0
    wait_seconds_last_step: float = 0.0
    #: buckets of the last step that some rank could not send finite, averaged densely instead
    fallback_buckets_last_step: int = 0

    world_size: int = 1

    def _dense_sent(self, dense_bytes: int) -> float:
        return dense_bytes * 2.0 * (self.world_size - 1) / self.world_size

    @property
    def ratio(self) -> float:
        """What a dense ring allreduce would send over what this rank sent, in the last step.

        With one process nothing is sent and the ratio is taken over bytes handed to collectives.
        """
        if self.world_size > 1 and self.sent_bytes_last_step:
            return self._dense_sent(self.dense_bytes_last_step) / self.sent_bytes_last_step
        return self.dense_bytes_last_step / self.bytes_last_step if self.bytes_last_step else 1.0

    @property
    def ratio_total(self) -> float:
        """As :attr:`ratio`, over every step since registration."""
        if self.world_size > 1 and self.sent_bytes_total:
            return self._dense_sent(self.dense_bytes_total) / self.sent_bytes_total
        return self.dense_bytes_total / self.bytes_total if self.bytes_total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "ratio_total": self.ratio_total}


class CompressionState:
    """The state the compression hook carries: config, per-rank memory, step and stats.

    Memory (residuals, shifts) is fp32 and keyed by parameter name, so DDP's bucket rebuild
    after the first step and on every new wrap (resume) does not scramble it. It belongs to
    this rank: :meth:`state_dict` holds this rank's memory only, and a checkpoint that must
    resume exactly keeps one per rank.

    Changes of ``density`` or ``bits`` (by a controller) are requested with :meth:`request_update`
    and applied at the next step boundary; controllers must request the same change on every
    rank, which they do when their decision is a function of data all ranks share.

    ``overlap`` (default True) lets buckets travel while the backward pass goes on; set it to
    False to finish every bucket's exchange inside its hook call (the same numbers, slower:
    for debugging and comparisons).
    """

    __slots__ = (
        # settings
        "config", "compressor", "feedback", "transport",
        # process group
        "process_group", "rank", "world_size", "collectives",
        # parameter bookkeeping
        "param_names", "param_index",
        # internal state
        "step", "memory", "server_memory", "velocity", "_pending", "_scratch", "adaptive", "_adaptive_saved",
        "momentum", "_momentum_saved", "pipeline", "overlap",
        # stats
        "stats", "_step_dense_bytes", "_step_err", "_step_norm", "_step_compressed", "_step_buckets",
        "_step_encode_s", "_step_decode_s", "_step_wait_s", "_step_fallbacks",
    )  # fmt: skip

    def __init__(
        self,
        config: CompressionConfig,
        param_names: Mapping[int, str],
        process_group: dist.ProcessGroup | None = None,
    ):
        self.process_group = process_group
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if initialized else 1
        self.rank = dist.get_rank(process_group) if initialized else 0
        self.collectives = Collectives(process_group, self.world_size, self.rank)
        self.param_names = dict(param_names)
        self.param_index = {name: i for i, name in enumerate(self.param_names.values())}
        self.step = 0
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.server_memory: dict[str, torch.Tensor] = {}
        self.velocity: dict[str, torch.Tensor] = {}  # the optimizer's momentum, per rank (see momentum.py)
        self.momentum = None  # an ExchangeMomentum when an optimizer's momentum is moved into the exchange
        self._momentum_saved: dict[str, Any] | None = None
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}  # buffers reused between steps, never saved
        self.adaptive = None  # an AdaptiveRun (GraVAC) when one is attached
        self._adaptive_saved: dict[str, Any] | None = None  # controller state loaded before attaching
        self._pending: dict[str, Any] = {}
        self.pipeline = StepPipeline()  # the buckets of the current step in flight
        # False: every bucket's exchange finishes before the hook returns (same results, no overlap)
        self.overlap = True
        self.stats = CompressionStats(world_size=self.world_size)
        self._set_config(config)
        self._reset_step_counters()
        if self.rank == 0:
            log.info("lightning_compress: %s on %d ranks via %s", config, self.world_size, self.transport)
            if config.feedback == "doublesqueeze":
                log.info(
                    "lightning_compress: DoubleSqueeze compresses twice (worker and aggregate); with SGD + momentum it "
                    "matched dense accuracy at about 0.6x the learning rate dense training uses "
                    "(benchmarks/results/convergence.md)"
                )

    # ----- configuration ------------------------------------------------------------------
    def _set_config(self, config: CompressionConfig) -> None:
        self.config = config
        self.compressor = config.make_compressor()
        self.feedback = make_feedback(config.feedback, self.compressor, diana_alpha=config.diana_alpha)
        self.transport = config.transport_resolved

    def request_update(self, **changes: Any) -> None:
        """Change ``density`` and/or ``bits`` from the next step on (validated now)."""
        allowed = {"density", "bits"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"request_update takes {sorted(allowed)}; got {sorted(changes)}")
        self.config.replace(**{**self._pending, **changes})  # validate before accepting
        self._pending.update(changes)

    # ----- per-step bookkeeping (called by the hook) -----------------------------------------
    def _reset_step_counters(self) -> None:
        self._step_dense_bytes = 0
        self._step_buckets = 0
        self._step_err = 0.0
        self._step_norm = 0.0
        self._step_compressed = False
        self._step_encode_s = self._step_decode_s = self._step_wait_s = 0.0
        self._step_fallbacks = 0

    def record_bucket(self, dense_bytes: int) -> None:
        """Count one bucket of the current step and the bytes a dense allreduce would take."""
        self._step_dense_bytes += dense_bytes
        self._step_buckets += 1

    def record_compression(self, err: float, norm: float) -> None:
        """Add one bucket's compression error and input energy (for the gain)."""
        self._step_err += err
        self._step_norm += norm
        self._step_compressed = True

    def record_wait(self, seconds: float) -> None:
        """Time the hook's thread spent blocked on collectives of this step."""
        self._step_wait_s += seconds

    def record_flights(self, flights, wait_seconds: float) -> None:
        """Add a drained step's flights (see :mod:`lightning_compress.exchange`) in bucket order."""
        self._step_wait_s += wait_seconds
        for f in flights:
            self._step_encode_s += f.hook_seconds
            self._step_decode_s += f.callback_seconds
            if f.failed:
                self._step_fallbacks += 1
            elif f.norm_sq is not None:
                self.record_compression(float(f.err_sq), float(f.norm_sq))

    def finish_step(self) -> None:
        """Close the step: roll stats, advance the counter, apply pending config changes."""
        if self.adaptive is not None:
            self.adaptive.finish_step(self)  # one small all_gather, counted in this step's bytes
        comm, s = self.collectives, self.stats
        s.bytes_last_step, s.sent_bytes_last_step = comm.bytes_handed, comm.bytes_sent
        s.dense_bytes_last_step = self._step_dense_bytes
        s.bytes_total += comm.bytes_handed
        s.sent_bytes_total += comm.bytes_sent
        s.dense_bytes_total += self._step_dense_bytes
        s.gain = 1.0 - self._step_err / self._step_norm if self._step_norm > 0 else 1.0
        s.compressed_last_step = self._step_compressed
        s.buckets_last_step = self._step_buckets
        s.encode_seconds_last_step = self._step_encode_s
        s.decode_seconds_last_step = self._step_decode_s
        s.wait_seconds_last_step = self._step_wait_s
        s.fallback_buckets_last_step = self._step_fallbacks
        s.steps += 1
        comm.bytes_handed, comm.bytes_sent = 0, 0.0
        self._reset_step_counters()
        self.step += 1
        if self._pending:
            self._set_config(self.config.replace(**self._pending))
            self._pending = {}

    def seed(self, name: str, *extra: int) -> int:
        """Seed shared by all ranks for tensor ``name`` at this step."""
        return mix_seed(self.config.seed, self.step, self.param_index[name], *extra)

    def rank_seed(self, name: str, *extra: int) -> int:
        """Seed private to this rank for tensor ``name`` at this step."""
        return mix_seed(self.seed(name, *extra), 1 + self.rank)

    def memory_for(self, name: str, numel: int, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's memory tensors for parameter ``name`` (zeros the first time)."""
        mem = self.memory.get(name)
        if mem is None or any(t.numel() != numel for t in mem.values()):
            mem = {key: torch.zeros(numel, dtype=torch.float32, device=device) for key in self.feedback.memory_keys}
            self.memory[name] = mem
        return mem

    def scratch(self, name: str, key: str, numel: int, device: torch.device) -> torch.Tensor:
        """A flat fp32 buffer for parameter ``name`` kept between steps (contents undefined).

        Reusing buffers spares the page faults of a fresh allocation, which for large
        tensors cost more than the compression itself.
        """
        buf = self._scratch.get((name, key))
        if buf is None or buf.numel() != numel or buf.device != torch.device(device):
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._scratch[(name, key)] = buf
        return buf

    def give_scratch(self, name: str, key: str, tensor: torch.Tensor) -> None:
        """Hand ``tensor`` (no longer referenced elsewhere) back as the scratch buffer ``key``."""
        self._scratch[(name, key)] = tensor

    def commit_velocity(self, name: str, velocity: torch.Tensor) -> None:
        """Make ``velocity`` (a ``"velocity"`` scratch buffer) parameter ``name``'s momentum; recycle the old one."""
        old = self.velocity.get(name)
        self.velocity[name] = velocity
        if old is not None and old.numel() == velocity.numel():
            self.give_scratch(name, "velocity", old)
        else:  # the buffer is memory now: the next step needs a scratch buffer of its own
            self._scratch.pop((name, "velocity"), None)

    def rescale_memory(self, factor: float) -> None:
        """Multiply every residual, shift and velocity (worker and server) by ``factor``.

        All feedback schemes are linear in their memory, which is kept in gradient units; when
        a loss scaler changes its scale, the memory must follow (exact for powers of two).
        """
        for mem in self.memory.values():
            for tensor in mem.values():
                tensor.mul_(factor)
        for tensor in (*self.server_memory.values(), *self.velocity.values()):
            tensor.mul_(factor)

    # ----- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: plain types and tensors only (``torch.load(weights_only=True)`` safe)."""
        return {
            "format": 1,
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self.step,
            "config": self.config.to_dict(),
            "pending": dict(self._pending),
            "memory": {name: {k: t.detach().clone() for k, t in mem.items()} for name, mem in self.memory.items()},
            "server_memory": {name: t.detach().clone() for name, t in self.server_memory.items()},
            "velocity": {name: t.detach().clone() for name, t in self.velocity.items()},
            "momentum": self.momentum.state_dict() if self.momentum is not None else self._momentum_saved,
            "stats": asdict(self.stats),
            "adaptive": self.adaptive.controller.state_dict() if self.adaptive is not None else self._adaptive_saved,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (this rank's own, for exact resume).

        The step, stats and the controller-adjustable settings (``density``, ``bits``) are
        always restored. Memory is restored only when the world size, compressor and feedback
        match; otherwise it starts fresh, with a warning.
        """
        saved = CompressionConfig.from_dict(state["config"])
        self.step = int(state["step"])
        self.stats = CompressionStats(**{**state["stats"], "world_size": self.world_size})
        self._set_config(self.config.replace(density=saved.density, bits=saved.bits))
        self._pending = dict(state.get("pending", {}))
        self.memory, self.server_memory, self.velocity = {}, {}, {}
        device = self._device()
        if int(state["world_size"]) == self.world_size:  # velocities are this rank's share: valid for one world size
            saved_velocity = state.get("velocity", {})
            self.velocity = {n: t.to(device=device, dtype=torch.float32).clone() for n, t in saved_velocity.items()}
        saved_momentum = state.get("momentum")
        if saved_momentum is not None:
            if self.momentum is not None:
                self.momentum.load_state_dict(saved_momentum)
            else:
                self._momentum_saved = dict(saved_momentum)  # applied by attach_optimizer
        saved_adaptive = state.get("adaptive")
        if saved_adaptive is not None:
            if self.adaptive is not None:
                self.adaptive.controller.load_state_dict(saved_adaptive)
            else:
                self._adaptive_saved = dict(saved_adaptive)  # applied by attach_gravac
        mismatch = []
        if int(state["world_size"]) != self.world_size:
            mismatch.append(f"world size {state['world_size']} -> {self.world_size}")
        for key in ("compressor", "feedback"):
            if getattr(saved, key) != getattr(self.config, key):
                mismatch.append(f"{key} {getattr(saved, key)!r} -> {getattr(self.config, key)!r}")
        if mismatch:
            warnings.warn(
                "lightning_compress: the saved compression memory does not fit this run ("
                + ", ".join(mismatch)
                + "); residuals and shifts (and, for another world size, momentum) start from zero. "
                "Training continues, but not bit-for-bit.",
                UserWarning,
                stacklevel=2,
            )
            return
        device = self._device()
        self.memory = {
            name: {k: t.to(device=device, dtype=torch.float32).clone() for k, t in mem.items()}
            for name, mem in state["memory"].items()
        }
        self.server_memory = {
            name: t.to(device=device, dtype=torch.float32).clone() for name, t in state["server_memory"].items()
        }

    def _device(self) -> torch.device:
        if self.process_group is not None or (dist.is_available() and dist.is_initialized()):
            backend = dist.get_backend(self.process_group)
            if backend == "nccl" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        # The process group cannot be pickled; the rest can.
        return {
            slot: getattr(self, slot)
            for slot in self.__slots__
            if slot not in ("process_group", "collectives", "pipeline", "momentum")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = None
        self.collectives = Collectives(None, self.world_size, self.rank)
        self.pipeline = StepPipeline()
        self.momentum = None
