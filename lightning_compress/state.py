"""``CompressionState``: config, per-rank memory, step counter and statistics of one DDP model."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from lightning_compress.adaptive_link import AdaptiveLink
from lightning_compress.collectives import Collectives
from lightning_compress.config import TWO_PASS_FROM, CompressionConfig, coarse_two_pass_hint
from lightning_compress.exchange import StepPipeline
from lightning_compress.feedback import make_feedback
from lightning_compress.nodes import make_hierarchy
from lightning_compress.state_checkpoint import STATE_FORMAT, StateCheckpointing  # noqa: F401  (re-exported)
from lightning_compress.stats import CompressionStats

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


class CompressionState(StateCheckpointing):
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

    ``param_shapes`` (name -> shape; :func:`~lightning_compress.register_compression` fills it
    from the model) lets checkpoints be checked tensor by tensor and the ranks compare their
    models (:mod:`lightning_compress.agreement`).
    """

    __slots__ = (
        # settings
        "config", "compressor", "feedback", "transport",
        # process group
        "process_group", "rank", "world_size", "collectives", "hierarchy",
        # parameter bookkeeping
        "param_names", "param_index", "param_shapes",
        # internal state
        "step", "memory", "server_memory", "velocity", "second_moment", "factors", "_pending", "_scratch", "adaptive", "_adaptive_saved",
        "momentum", "_momentum_saved", "pipeline", "overlap", "_adjusted",
        # the ranks' settings check: why one is due at the next step, and what was attached at the last one
        "_agreement_due", "_agreed_attachments", "started",
        # stats
        "stats", "_step_dense_bytes", "_step_err", "_step_norm", "_step_compressed", "_step_buckets",
        "_step_encode_s", "_step_decode_s", "_step_wait_s", "_step_fallbacks",
    )  # fmt: skip

    def __init__(
        self,
        config: CompressionConfig,
        param_names: Mapping[int, str],
        process_group: dist.ProcessGroup | None = None,
        param_shapes: Mapping[str, Sequence[int]] | None = None,
    ):
        self.process_group = process_group
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if initialized else 1
        self.rank = dist.get_rank(process_group) if initialized else 0
        self.collectives = Collectives(process_group, self.world_size, self.rank)
        self.param_names = dict(param_names)
        self.param_index = {name: i for i, name in enumerate(self.param_names.values())}
        self.param_shapes = {name: tuple(int(d) for d in shape) for name, shape in (param_shapes or {}).items()}
        self.step = 0
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.server_memory: dict[str, torch.Tensor] = {}
        self.velocity: dict[str, torch.Tensor] = {}  # the optimizer's momentum, per rank (see momentum.py)
        self.second_moment: dict[str, torch.Tensor] = {}  # Adam's second moment, per rank (momentum="adam_step")
        self.factors: dict[str, torch.Tensor] = {}  # PowerSGD's warm-start Q per parameter (m x r, alike on all ranks)
        self.momentum = None  # an ExchangeMomentum when an optimizer's momentum is moved into the exchange
        self._momentum_saved: dict[str, Any] | None = None
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}  # buffers reused between steps, never saved
        self.adaptive: AdaptiveLink | None = None  # an AdaptiveRun (GraVAC) once attach_adaptive attached one
        self._adaptive_saved: dict[str, Any] | None = None  # controller state loaded before attaching
        self._pending: dict[str, Any] = {}
        self._adjusted: set[str] = set()  # settings a controller changed (request_update): checkpoints restore them
        # Every rank checks at its first step (see lightning_compress.agreement), so it is due from the start.
        self._agreement_due: str | None = "at the first step"
        self._agreed_attachments: tuple[int, int] = (id(None), id(None))
        self.started = False  # a step's check passed: training started (later checks wait less, see agreement)
        self.pipeline = StepPipeline()  # the buckets of the current step in flight
        # False: every bucket's exchange finishes before the hook returns (same results, no overlap)
        self.overlap = True
        self.stats = CompressionStats(world_size=self.world_size)
        self.hierarchy = None
        self._set_config(config)
        # hierarchical=True: the node layout and its process groups, made here on every rank (None: flat)
        self.hierarchy = make_hierarchy(config, self)
        if self.hierarchy is not None:
            self._set_config(config)
        self._reset_step_counters()
        if self.rank == 0:
            # The integrations print the settings once, in their start line (lightning_compress.report).
            log.debug("lightning_compress: %s on %d ranks via %s", config, self.world_size, self.transport)
            hint = coarse_two_pass_hint(config, self.transport)
            if hint is not None:
                log.info("lightning_compress: %s", hint)
            if self.transport == "allgather" and self.world_size >= TWO_PASS_FROM:
                warnings.warn(
                    f"lightning_compress: {config.compressor}/{config.feedback} travels by all_gather, so each of the "
                    f"{self.world_size} ranks sends {self.world_size - 1} payloads per step and the bytes per rank grow "
                    "with the number of ranks; feedback='ef' (two compressed passes) or a compressor whose payloads add "
                    "up (randk with diana, fp16) keep them flat",
                    UserWarning,
                    stacklevel=2,
                )

    def __repr__(self) -> str:
        s = self.stats
        memory = sum(t.numel() * t.element_size() for mem in self.memory.values() for t in mem.values())
        memory += sum(t.numel() * t.element_size()
                      for t in (*self.server_memory.values(), *self.velocity.values(), *self.second_moment.values(),
                                *self.factors.values()))
        parts = [
            f"{self.config.compressor}/{self.config.feedback} via {self.transport}",
            f"rank {self.rank} of {self.world_size}",
            f"step {self.step}",
            f"{len(self.param_shapes) or len(self.param_names)} tensors",
            f"memory {len(self.memory)} tensors ({memory / 2**20:.3g} MiB)",
        ]
        if s.steps:
            parts.append(f"last step ratio {s.ratio:.1f}x, gain {s.gain:.3f}")
            parts.append(f"sent {s.sent_bytes_total:.0f} B in total ({s.ratio_total:.1f}x fewer than dense)")
        if self.momentum is not None:
            parts.append(f"momentum {self.momentum.mode}")
        if self.adaptive is not None:
            parts.append(f"GraVAC at CF {self.adaptive.controller.last_sent_cf:g}")
        return f"CompressionState({', '.join(parts)})"

    # ----- configuration ------------------------------------------------------------------
    def attach_adaptive(self, run: AdaptiveLink) -> None:
        """Let ``run`` (GraVAC's :class:`~lightning_compress.adaptive.AdaptiveRun`) drive this state's compression.

        A controller state that :meth:`load_state_dict` brought before any run was attached goes to
        ``run.controller`` first (and is then forgotten); later checkpoints save and restore it there.
        """
        if self._adaptive_saved is not None:  # a checkpoint was loaded before the controller existed
            run.controller.load_state_dict(self._adaptive_saved)
            self._adaptive_saved = None
        self.adaptive = run
        config = self.config.without_default_density_warmup()  # GraVAC picks the density itself
        if config is not self.config:
            self._set_config(config)

    def attach_momentum(self, momentum: Any) -> None:
        """Carry ``momentum`` (an :class:`~lightning_compress.momentum.ExchangeMomentum`) in this exchange.

        Momentum settings that :meth:`load_state_dict` brought before any optimizer was attached go to
        ``momentum`` first (and are then forgotten); later checkpoints save and restore them there.
        """
        if self._momentum_saved is not None:  # a checkpoint was loaded before the optimizer was attached
            momentum.load_state_dict(self._momentum_saved)
            self._momentum_saved = None
        self.momentum = momentum

    def _set_config(self, config: CompressionConfig) -> None:
        self.config = config
        self._make_compressor()
        if getattr(self, "hierarchy", None) is not None:
            self.transport = "hierarchical"  # lightning_compress.hierarchy; across nodes config.transport_for(nodes)
        else:
            self.transport = config.transport_for(self.world_size, adaptive=self.adaptive is not None)

    def _make_compressor(self) -> None:
        """The compressor (and the feedback around it) for this step: the config's, at the density
        :meth:`~lightning_compress.CompressionConfig.density_at` gives for ``step``."""
        config = self.config
        density = config.density_at(self.step)
        self.compressor = (config if density == config.density else config.replace(density=density)).make_compressor()
        self.feedback = make_feedback(
            config.feedback, self.compressor, diana_alpha=config.diana_alpha, ef21_step=self.ef21_step()
        )

    def ef21_step(self) -> float:
        """EF21's estimate step now: ``config.ef21_step_for`` the kind of optimizer whose momentum runs in the
        exchange (``None`` without one). The hook sets it on the scheme at the start of every step."""
        momentum = getattr(self, "momentum", None)
        return self.config.ef21_step_for(None if momentum is None else momentum.kind)

    def _follow_density_schedule(self) -> None:
        """Rebuild the compressor where the density warm-up changes the density at this step."""
        if self.config.density_warmup_steps_resolved and self.compressor.density != self.config.density_at(self.step):
            self._make_compressor()

    def keep_warmup(self, changes: dict[str, Any]) -> dict[str, Any]:
        """``changes`` of ``density``, with the density warm-up's length that the config resolves to now
        where it is the default: a new density changes the schedule's target, not whether there is one."""
        if "density" in changes and self.config.density_warmup_steps is None:
            return {**changes, "density_warmup_steps": self.config.density_warmup_steps_resolved}
        return changes

    def request_update(self, **changes: Any) -> None:
        """Change ``density`` and/or ``bits`` from the next step on (validated now).

        During a density warm-up (``density_warmup_steps``) the new ``density`` becomes the
        schedule's target: each step keeps what ``config.density_at(step)`` gives for it, which
        is at least the new value and may be more until the warm-up ends.
        """
        allowed = {"density", "bits"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"request_update takes {sorted(allowed)}; got {sorted(changes)}")
        self.config.replace(**{**self._pending, **changes})  # validate before accepting
        self._pending.update(changes)
        self._adjusted.update(changes)

    # ----- the ranks' settings check ------------------------------------------------------------
    def agreement_due(self) -> str | None:
        """Why the ranks must compare digests at this step (see :mod:`lightning_compress.agreement`), or ``None``.

        Due at the first step, after :meth:`load_state_dict`, and after an optimizer (momentum)
        or an adaptive controller was attached or replaced.
        """
        if self._agreement_due is None and (id(self.momentum), id(self.adaptive)) != self._agreed_attachments:
            return "at the first step after an optimizer or controller was attached"
        return self._agreement_due

    def agreed(self) -> None:
        """Record that the ranks just agreed on everything this state holds."""
        self._agreement_due = None
        self._agreed_attachments = (id(self.momentum), id(self.adaptive))
        self.started = True

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
        # Collectives of all ranks may cross nodes; of a hierarchy's two groups only the cross-node one does.
        handed, sent, across = comm.bytes_handed, comm.bytes_sent, comm.bytes_sent
        if self.hierarchy is not None:
            handed, sent, across = (a + b for a, b in zip((handed, sent, across), self.hierarchy.take_counts()))
        s.bytes_last_step, s.sent_bytes_last_step, s.sent_bytes_across_nodes_last_step = handed, sent, across
        s.dense_bytes_last_step = self._step_dense_bytes
        s.bytes_total += handed
        s.sent_bytes_total += sent
        s.sent_bytes_across_nodes_total += across
        s.dense_bytes_total += self._step_dense_bytes
        s.gain = 1.0 - self._step_err / self._step_norm if self._step_norm > 0 else 1.0
        s.compressed_last_step = self._step_compressed
        s.buckets_last_step = self._step_buckets
        s.encode_seconds_last_step = self._step_encode_s
        s.decode_seconds_last_step = self._step_decode_s
        s.wait_seconds_last_step = self._step_wait_s
        s.fallback_buckets_last_step = self._step_fallbacks
        s.encode_seconds_total += self._step_encode_s
        s.decode_seconds_total += self._step_decode_s
        s.wait_seconds_total += self._step_wait_s
        if self._step_compressed:
            s.compressed_steps += 1
            s.gain_sum += s.gain
        s.steps += 1
        comm.bytes_handed, comm.bytes_sent = 0, 0.0
        self._reset_step_counters()
        self.step += 1
        if self._pending:
            self._set_config(self.config.replace(**self.keep_warmup(self._pending)))
            self._pending = {}
        self._follow_density_schedule()

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

    def commit_buffer(self, store: dict[str, torch.Tensor], name: str, key: str, tensor: torch.Tensor) -> None:
        """Make ``tensor`` (the ``key`` scratch buffer of ``name``) ``store[name]``; recycle the old one as scratch."""
        old = store.get(name)
        store[name] = tensor
        if old is not None and old.numel() == tensor.numel():
            self.give_scratch(name, key, old)
        else:  # the buffer is memory now: the next step needs a scratch buffer of its own
            self._scratch.pop((name, key), None)

    def commit_factor(self, name: str, factor: torch.Tensor) -> None:
        """Make ``factor`` (a ``"factor"`` scratch buffer) PowerSGD's warm-start ``Q`` of ``name``; recycle the old one."""
        self.commit_buffer(self.factors, name, "factor", factor)

    def commit_velocity(self, name: str, velocity: torch.Tensor) -> None:
        """Make ``velocity`` (a ``"velocity"`` scratch buffer) parameter ``name``'s momentum; recycle the old one."""
        self.commit_buffer(self.velocity, name, "velocity", velocity)

    def commit_second_moment(self, name: str, second: torch.Tensor) -> None:
        """Make ``second`` (a ``"second"`` scratch buffer) parameter ``name``'s second moment (``adam_step``)."""
        self.commit_buffer(self.second_moment, name, "second", second)

    def rescale_memory(self, factor: float) -> None:
        """Multiply every residual, shift and velocity (worker and server) by ``factor``, second moments by its square.

        All feedback schemes are linear in their memory, which is kept in gradient units; when
        a loss scaler changes its scale, the memory must follow (exact for powers of two).
        """
        for mem in self.memory.values():
            for tensor in mem.values():
                tensor.mul_(factor)
        for tensor in (*self.server_memory.values(), *self.velocity.values()):
            tensor.mul_(factor)
        for tensor in self.second_moment.values():
            tensor.mul_(factor * factor)

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
            if slot not in ("process_group", "collectives", "hierarchy", "pipeline", "momentum")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = None
        self.collectives = Collectives(None, self.world_size, self.rank)
        self.pipeline = StepPipeline()
        self.momentum = None
        self.hierarchy = None  # its process groups stay behind: the copy runs flat
