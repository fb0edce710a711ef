"""Saving and restoring a :class:`~lightning_compress.state.CompressionState`: its ``state_dict`` and the checks
``load_state_dict`` makes before it changes anything."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Any, Mapping

import torch

from lightning_compress.compressors.powersgd import matrix_shape
from lightning_compress.config import DENSITY_COMPRESSORS, CompressionConfig
from lightning_compress.stats import _STATS_FIELDS, CompressionStats
from lightning_compress.transport import shard_bounds

__all__ = ["STATE_FORMAT", "StateCheckpointing"]

#: The layout :meth:`CompressionState.state_dict` writes (format 1 is still read).
STATE_FORMAT = 2
_REQUIRED_KEYS = ("format", "world_size", "step", "config", "memory", "server_memory", "stats")
# Which compressors read a controller-adjustable setting.
_USES = {"density": DENSITY_COMPRESSORS, "bits": ("qsgd",)}
_NOT_FINITE = "holds NaN/inf values"



class StateCheckpointing:
    """The checkpoint half of :class:`~lightning_compress.state.CompressionState` (a base class of it)."""

    __slots__ = ()

    # ----- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: plain types and tensors only (``torch.load(weights_only=True)`` safe).

        Format 2 adds, to format 1, the shape of the parameter behind every memory and velocity
        tensor (``"shapes"``) and the settings a controller changed (``"adjusted"``).
        """
        saved_names = set(self.memory) | set(self.server_memory) | set(self.velocity) | set(self.factors)
        saved_names |= set(self.second_moment)
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
            "second_moment": {name: t.detach().clone() for name, t in self.second_moment.items()},
            "factors": {name: t.detach().clone() for name, t in self.factors.items()},
            "shapes": {name: list(self.param_shapes[name]) for name in sorted(saved_names & set(self.param_shapes))},
            "node_layout": self._node_layout(),
            "momentum": self.momentum.state_dict() if self.momentum is not None else self._momentum_saved,
            "stats": asdict(self.stats),
            "adaptive": self.adaptive.controller.state_dict() if self.adaptive is not None else self._adaptive_saved,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state :meth:`state_dict` saved on this rank (format 2, or the earlier format 1).

        Everything is checked before anything changes; a state that is refused leaves this one as it was.

        * Structure: the keys :meth:`state_dict` writes must be there (``ValueError`` naming the missing ones).
        * Rank: with the same world size the state must be this rank's own (``ValueError``).
        * World size, compressor, feedback, node layout (``hierarchical``: memory holds this rank's shard):
          when one differs, all memory starts from zero (a warning; velocities survive a compressor change).
        * PowerSGD's factors (the same on every rank, any world size): restored when both runs use
          ``powersgd`` and the factor fits this run's shape and ``powersgd_rank``; others start afresh.
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
        second_moment = self._restorable_velocity(state, saved_world, fmt, notes, "second_moment")
        factors = self._restorable_factors(state, saved, notes)
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
        self._follow_density_schedule()  # the density warm-up's density at the loaded step
        self._pending, self._adjusted = pending, adjusted
        self.memory, self.server_memory, self.velocity, self.factors = memory, server_memory, velocity, factors
        self.second_moment = second_moment
        saved_momentum = state.get("momentum")
        if saved_momentum is not None:
            if self.momentum is not None:
                self.momentum.load_state_dict(saved_momentum)
            else:
                self._momentum_saved = dict(saved_momentum)  # applied by attach_optimizer
        if saved_adaptive is not None and self.adaptive is None:
            self._adaptive_saved = dict(saved_adaptive)  # applied by attach_adaptive
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
        return self.config.replace(**self.keep_warmup(changes)), pending, adjusted if restore else set()

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

    def _node_layout(self) -> list[int] | None:
        """``[ranks per node, nodes]`` of a hierarchical exchange (``None``: flat)."""
        return None if self.hierarchy is None else list(self.hierarchy.layout)

    def _memory_numel(self, name: str) -> int | None:
        """Values in each memory tensor of ``name``: ``None`` for the parameter's own; with a hierarchy, its shard's."""
        shape = self.param_shapes.get(name)
        return None if self.hierarchy is None or shape is None else self.hierarchy.memory_numel(math.prod(shape))

    def _restorable_memory(self, state, saved: CompressionConfig, saved_world: int, fmt: int, notes: list[str]):
        """The memory and server memory to restore, checked tensor by tensor."""
        mismatch = []
        if saved_world != self.world_size:
            mismatch.append(f"world size {saved_world} -> {self.world_size}")
        for key in ("compressor", "feedback"):
            if getattr(saved, key) != getattr(self.config, key):
                mismatch.append(f"{key} {getattr(saved, key)!r} -> {getattr(self.config, key)!r}")
        saved_layout = state.get("node_layout")  # hierarchical: memory holds this rank's shard in that layout
        if (list(saved_layout) if saved_layout else None) != self._node_layout():
            mismatch.append(f"node layout (ranks per node, nodes) {saved_layout} -> {self._node_layout()}")
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
                why = self._fit(name, mem, shapes, fmt, numel=self._memory_numel(name))
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
                shard = hi - lo if self.hierarchy is None else self.hierarchy.server_numel(math.prod(expected))
            why = self._fit(name, {"server residual": t}, shapes, fmt, numel=shard)
            if why is not None:
                notes.append(f"server memory of {name!r}: {why}")
                continue
            server_memory[name] = t.to(device=device, dtype=torch.float32).clone()
        return memory, server_memory

    def _restorable_factors(self, state, saved: CompressionConfig, notes: list[str]) -> dict[str, torch.Tensor]:
        """PowerSGD's warm-start factors to restore (``m x r``, checked against the model and the rank)."""
        if saved.compressor != "powersgd" or self.config.compressor != "powersgd":
            return {}
        device, rank = self._device(), self.config.powersgd_rank
        factors = {}
        for name, t in dict(state.get("factors") or {}).items():
            why = None
            if self.param_index and name not in self.param_index:
                why = "not a parameter of this model"
            elif name in self.param_shapes:
                want = (matrix_shape(self.param_shapes[name])[1], rank)
                if tuple(t.shape) != want:
                    why = f"factor of shape {tuple(t.shape)}, {want} expected (powersgd_rank={rank})"
            if why is None and not bool(torch.isfinite(t).all()):
                why = f"factor {_NOT_FINITE}"
            if why is not None:
                notes.append(f"PowerSGD factor of {name!r}: {why}")
                continue
            factors[name] = t.to(device=device, dtype=torch.float32).clone()
        return factors

    def _restorable_velocity(
        self, state, saved_world: int, fmt: int, notes: list[str], key: str = "velocity"
    ) -> dict[str, torch.Tensor]:
        """The velocities (or, ``key="second_moment"``, Adam's second moments; checkpoints before
        ``adam_step`` have none) to restore: this rank's share of the momentum, valid for one world size."""
        if saved_world != self.world_size:
            return {}
        shapes, device = state.get("shapes") or {}, self._device()
        velocity = {}
        for name, t in dict(state.get(key) or {}).items():
            why = self._fit(name, {key: t}, shapes, fmt)
            if why is not None:
                notes.append(f"{key.replace('_', ' ')} of {name!r}: {why}")
                continue
            if key == "second_moment" and bool((t < 0).any()):
                notes.append(f"second moment of {name!r}: holds negative values")
                continue
            velocity[name] = t.to(device=device, dtype=torch.float32).clone()
        return velocity
