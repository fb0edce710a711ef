"""``CompressionState``: config, per-rank memory, step counter and statistics of one DDP model."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from lightning_compress.config import TWO_PASS_FROM, CompressionConfig
from lightning_compress.exchange import StepPipeline
from lightning_compress.feedback import make_feedback
from lightning_compress.transport import Collectives, shard_bounds

__all__ = ["CompressionState", "CompressionStats", "mix_seed"]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

#: The layout :meth:`CompressionState.state_dict` writes (format 1 is still read).
STATE_FORMAT = 2
_REQUIRED_KEYS = ("format", "world_size", "step", "config", "memory", "server_memory", "stats")
# Which compressors read a controller-adjustable setting.
_USES = {"density": ("topk", "dgc", "randk"), "bits": ("qsgd",)}
_NOT_FINITE = "holds NaN/inf values"


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
    #: since registration (and, after a resume, since the start of training): steps that compressed
    #: something, the sum of their gains, and the seconds counted per step above
    compressed_steps: int = 0
    gain_sum: float = 0.0
    encode_seconds_total: float = 0.0
    decode_seconds_total: float = 0.0
    wait_seconds_total: float = 0.0

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

    @property
    def mean_gain(self) -> float:
        """:attr:`gain` averaged over the steps that compressed something (1.0 before the first)."""
        return self.gain_sum / self.compressed_steps if self.compressed_steps else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "ratio_total": self.ratio_total, "mean_gain": self.mean_gain}


_STATS_FIELDS = frozenset(f.name for f in fields(CompressionStats))


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

    ``param_shapes`` (name -> shape; :func:`~lightning_compress.register_compression` fills it
    from the model) lets checkpoints be checked tensor by tensor and the ranks compare their
    models (:mod:`lightning_compress.agreement`).
    """

    __slots__ = (
        # settings
        "config", "compressor", "feedback", "transport",
        # process group
        "process_group", "rank", "world_size", "collectives",
        # parameter bookkeeping
        "param_names", "param_index", "param_shapes",
        # internal state
        "step", "memory", "server_memory", "velocity", "_pending", "_scratch", "adaptive", "_adaptive_saved",
        "momentum", "_momentum_saved", "pipeline", "overlap", "_adjusted",
        # the ranks' settings check: why one is due at the next step, and what was attached at the last one
        "_agreement_due", "_agreed_attachments",
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
        self.momentum = None  # an ExchangeMomentum when an optimizer's momentum is moved into the exchange
        self._momentum_saved: dict[str, Any] | None = None
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}  # buffers reused between steps, never saved
        self.adaptive = None  # an AdaptiveRun (GraVAC) when one is attached
        self._adaptive_saved: dict[str, Any] | None = None  # controller state loaded before attaching
        self._pending: dict[str, Any] = {}
        self._adjusted: set[str] = set()  # settings a controller changed (request_update): checkpoints restore them
        # Every rank checks at its first step (see lightning_compress.agreement), so it is due from the start.
        self._agreement_due: str | None = "at the first step"
        self._agreed_attachments: tuple[int, int] = (id(None), id(None))
        self.pipeline = StepPipeline()  # the buckets of the current step in flight
        # False: every bucket's exchange finishes before the hook returns (same results, no overlap)
        self.overlap = True
        self.stats = CompressionStats(world_size=self.world_size)
        self._set_config(config)
        self._reset_step_counters()
        if self.rank == 0:
            # The integrations print the settings once, in their start line (lightning_compress.report).
            log.debug("lightning_compress: %s on %d ranks via %s", config, self.world_size, self.transport)
            if self.transport == "two_pass" and config.feedback in ("ef", "doublesqueeze"):
                log.info(
                    "lightning_compress: DoubleSqueeze compresses twice (worker and aggregate): where it trails dense "
                    "accuracy, lower the learning rate (on digits with SGD + momentum, 0.6x closed most of the gap; "
                    "see the README's convergence results)"
                )
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
        memory += sum(t.numel() * t.element_size() for t in (*self.server_memory.values(), *self.velocity.values()))
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
    def _set_config(self, config: CompressionConfig) -> None:
        self.config = config
        self.compressor = config.make_compressor()
        self.feedback = make_feedback(config.feedback, self.compressor, diana_alpha=config.diana_alpha)
        self.transport = config.transport_for(self.world_size, adaptive=self.adaptive is not None)

    def request_update(self, **changes: Any) -> None:
        """Change ``density`` and/or ``bits`` from the next step on (validated now)."""
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

    def commit_buffer(self, store: dict[str, torch.Tensor], name: str, key: str, tensor: torch.Tensor) -> None:
        """Make ``tensor`` (the ``key`` scratch buffer of ``name``) ``store[name]``; recycle the old one as scratch."""
        old = store.get(name)
        store[name] = tensor
        if old is not None and old.numel() == tensor.numel():
            self.give_scratch(name, key, old)
        else:  # the buffer is memory now: the next step needs a scratch buffer of its own
            self._scratch.pop((name, key), None)

    def commit_velocity(self, name: str, velocity: torch.Tensor) -> None:
        """Make ``velocity`` (a ``"velocity"`` scratch buffer) parameter ``name``'s momentum; recycle the old one."""
        self.commit_buffer(self.velocity, name, "velocity", velocity)

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
        """This rank's state: plain types and tensors only (``torch.load(weights_only=True)`` safe).

        Format 2 adds, to format 1, the shape of the parameter behind every memory and velocity
        tensor (``"shapes"``) and the settings a controller changed (``"adjusted"``).
        """
        saved_names = set(self.memory) | set(self.server_memory) | set(self.velocity)
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self.step,
            "config": self.config.to_dict(),
            "pending": dict(self._pending),
            "adjusted": sorted(self._adjusted),
            "memory": {name: {k: t.detach().clone() for k, t in mem.items()} for name, mem in self.memory.items()},
            "server_memory": {name: t.detach().clone() for name, t in self.server_memory.items()},
            "velocity": {name: t.detach().clone() for name, t in self.velocity.items()},
            "shapes": {name: list(self.param_shapes[name]) for name in sorted(saved_names & set(self.param_shapes))},
            "momentum": self.momentum.state_dict() if self.momentum is not None else self._momentum_saved,
            "stats": asdict(self.stats),
            "adaptive": self.adaptive.controller.state_dict() if self.adaptive is not None else self._adaptive_saved,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state :meth:`state_dict` saved on this rank (format 2, or the earlier format 1).

        Everything is checked before anything changes; a state that is refused leaves this one as it was.

        * Structure: the keys :meth:`state_dict` writes must be there (``ValueError`` naming the missing ones).
        * Rank: with the same world size the state must be this rank's own (``ValueError``).
        * World size, compressor, feedback: when one differs, all memory starts from zero (a warning;
          velocities survive a compressor change).
        * Per tensor (memory, server memory, velocity): an entry for a name the model does not have is
          dropped; one saved for another shape (format 1: another size), or holding NaN/inf, starts
          from zero; one warning names every such tensor and the reason. EF21/DIANA estimates that are
          not finite are refused (``ValueError``): the ranks share them, and one rank cannot restart alone.
        * ``density``/``bits``: taken from the checkpoint only when a controller adjusted them
          (``request_update``, or a GraVAC controller attached or saved) and the compressor is the same;
          where the checkpoint's value and this run's differ, a warning names both and the one that runs.

        Call it on every rank: the ranks compare settings and step at the next hook call
        (:mod:`lightning_compress.agreement`).

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: keys are missing, the format is unknown, the saved config is invalid, the state is
                another rank's, or EF21/DIANA memory is not finite; or a saved GraVAC state does not fit
                the attached controller.
        """
        saved, saved_world, fmt = self._check_structure(state)
        notes: list[str] = []
        memory, server_memory = self._restorable_memory(state, saved, saved_world, fmt, notes)
        velocity = self._restorable_velocity(state, saved_world, fmt, notes)
        config, pending, adjusted = self._restored_settings(state, saved)
        stats = {k: v for k, v in dict(state["stats"]).items() if k in _STATS_FIELDS}
        # The last check that can fail changes nothing when it fails (GraVACController.load_state_dict).
        saved_adaptive = state.get("adaptive")
        if saved_adaptive is not None and self.adaptive is not None:
            self.adaptive.controller.load_state_dict(saved_adaptive)
        # ----- from here on nothing raises ----------------------------------------------------------
        if notes:
            shown = "; ".join(notes[:8]) + (f"; and {len(notes) - 8} more" if len(notes) > 8 else "")
            warnings.warn(
                f"lightning_compress: saved compression memory that does not fit this model starts from zero: {shown}. "
                "Training continues, but not bit-for-bit.",
                UserWarning,
                stacklevel=2,
            )
        self.step = int(state["step"])
        self.stats = CompressionStats(**{**stats, "world_size": self.world_size})
        if config != self.config:
            self._set_config(config)
        self._pending, self._adjusted = pending, adjusted
        self.memory, self.server_memory, self.velocity = memory, server_memory, velocity
        saved_momentum = state.get("momentum")
        if saved_momentum is not None:
            if self.momentum is not None:
                self.momentum.load_state_dict(saved_momentum)
            else:
                self._momentum_saved = dict(saved_momentum)  # applied by attach_optimizer
        if saved_adaptive is not None and self.adaptive is None:
            self._adaptive_saved = dict(saved_adaptive)  # applied by attach_gravac
        self._agreement_due = "at the first step after load_state_dict"

    def _check_structure(self, state: Any) -> tuple[CompressionConfig, int, int]:
        """The saved config, world size and format, once the keys, format, config and rank are checked."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"load_state_dict takes the dict CompressionState.state_dict() returns; got {type(state).__name__}"
            )
        missing = [key for key in _REQUIRED_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"the compression state is missing the key(s) {missing}; load_state_dict takes the dict "
                f"CompressionState.state_dict() returns (keys {list(_REQUIRED_KEYS)} and more), "
                f"got keys {sorted(state)}"
            )
        fmt = state["format"]
        if fmt not in (1, STATE_FORMAT):
            raise ValueError(
                f"compression state format {fmt!r} is not supported; this version reads formats 1 and {STATE_FORMAT}"
            )
        try:
            saved = CompressionConfig.from_dict(state["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"the saved compression config is not valid: {err}") from err
        saved_world = int(state["world_size"])
        saved_rank = state.get("rank")
        if saved_world == self.world_size and saved_rank is not None and int(saved_rank) != self.rank:
            raise ValueError(
                f"this is rank {saved_rank}'s compression state, but this process is rank {self.rank}: memory "
                f"belongs to the rank that saved it. Give each rank its own (save state_dict() on every rank, e.g. to "
                f"'compression-rank{{rank}}.pt', and load rank r's file on rank r)."
            )
        return saved, saved_world, int(fmt)

    def _restored_settings(self, state: Mapping[str, Any], saved: CompressionConfig):
        """``(config, pending, adjusted)`` after the load: controller-set ``density``/``bits`` come back."""
        adjusted = set(state.get("adjusted") or ())
        controlled = bool(adjusted) or self.adaptive is not None or state.get("adaptive") is not None
        restore = controlled and saved.compressor == self.config.compressor
        changes = {}
        for key in ("density", "bits"):
            mine, theirs = getattr(self.config, key), getattr(saved, key)
            if mine == theirs:
                continue
            if restore:
                changes[key] = theirs
                warnings.warn(
                    f"lightning_compress: `{key}={theirs!r}` from the checkpoint (set there by a controller) replaces "
                    f"this run's `{key}={mine!r}`; compressor {saved.compressor!r} continues with {theirs!r}.",
                    UserWarning,
                    stacklevel=3,
                )
            elif self.config.compressor in _USES[key]:
                warnings.warn(
                    f"lightning_compress: this run uses `{key}={mine!r}` as configured; the checkpoint was saved with "
                    f"`{key}={theirs!r}` (compressor {saved.compressor!r}), which is not restored.",
                    UserWarning,
                    stacklevel=3,
                )
        pending = dict(state.get("pending") or {}) if restore else {}
        if pending:
            self.config.replace(**{**changes, **pending})  # validate now, not at the next step
        return self.config.replace(**changes), pending, adjusted if restore else set()

    def _fit(self, name: str, tensors: dict[str, torch.Tensor], shapes: Mapping[str, Any], fmt: int,
             numel: int | None = None) -> str | None:  # fmt: skip
        """Why saved tensors of parameter ``name`` cannot be restored (``None``: they can)."""
        if self.param_index and name not in self.param_index:
            return "not a parameter of this model"
        expected = self.param_shapes.get(name)
        if expected is not None:
            saved_shape = shapes.get(name)
            if fmt >= 2 and saved_shape is not None and tuple(saved_shape) != expected:
                return f"saved for shape {tuple(saved_shape)}, the parameter has shape {expected}"
            want = math.prod(expected) if numel is None else numel
            for key, t in tensors.items():
                if t.numel() != want:
                    return f"{key} holds {t.numel()} values, {want} expected"
        for key, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                return f"{key} {_NOT_FINITE}"
        return None

    def _restorable_memory(self, state, saved: CompressionConfig, saved_world: int, fmt: int, notes: list[str]):
        """The memory and server memory to restore, checked tensor by tensor."""
        mismatch = []
        if saved_world != self.world_size:
            mismatch.append(f"world size {saved_world} -> {self.world_size}")
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
                stacklevel=3,
            )
            return {}, {}
        shapes = state.get("shapes") or {}
        device = self._device()
        keys = set(self.feedback.memory_keys)
        # EF21/DIANA: the ranks' estimates add up to a shared one; one rank cannot restart its own alone.
        shared = bool(self.feedback.shared_keys)
        memory: dict[str, dict[str, torch.Tensor]] = {}
        for name, mem in dict(state["memory"]).items():
            mem = dict(mem)
            if set(mem) != keys:
                why = f"holds {sorted(mem)}, feedback {self.feedback.name!r} keeps {sorted(keys)}"
            else:
                why = self._fit(name, mem, shapes, fmt)
            if shared and why is not None and why.endswith(_NOT_FINITE):
                raise ValueError(
                    f"the saved {self.feedback.name} memory of {name!r}: {why}. {self.feedback.name.upper()} keeps "
                    "estimates that the ranks share, and one rank cannot restart them alone. Resume from an earlier "
                    "checkpoint, or empty the memory of every rank's state (state['memory'] = {}) so that all ranks "
                    "restart it together."
                )
            if why is not None:
                notes.append(f"memory of {name!r}: {why}")
                continue
            memory[name] = {k: t.to(device=device, dtype=torch.float32).clone() for k, t in mem.items()}
        server_memory: dict[str, torch.Tensor] = {}
        for name, t in dict(state["server_memory"]).items():
            shard = None
            expected = self.param_shapes.get(name)
            if expected is not None:
                lo, hi = shard_bounds(math.prod(expected), self.world_size, self.rank)
                shard = hi - lo
            why = self._fit(name, {"server residual": t}, shapes, fmt, numel=shard)
            if why is not None:
                notes.append(f"server memory of {name!r}: {why}")
                continue
            server_memory[name] = t.to(device=device, dtype=torch.float32).clone()
        return memory, server_memory

    def _restorable_velocity(self, state, saved_world: int, fmt: int, notes: list[str]) -> dict[str, torch.Tensor]:
        """The velocities to restore: this rank's share of the momentum, valid for one world size."""
        if saved_world != self.world_size:
            return {}
        shapes, device = state.get("shapes") or {}, self._device()
        velocity = {}
        for name, t in dict(state.get("velocity") or {}).items():
            why = self._fit(name, {"velocity": t}, shapes, fmt)
            if why is not None:
                notes.append(f"velocity of {name!r}: {why}")
                continue
            velocity[name] = t.to(device=device, dtype=torch.float32).clone()
        return velocity

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
