"""``enable()``: compressed gradient exchange on a model prepared by an ``accelerate.Accelerator``."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import warnings
from typing import Any, Mapping

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from accelerate_compress.flag import adaptive_from_env, adaptive_options, config_from_env, resolve
from lightning_compress.adaptive import attach_gravac
from lightning_compress.config import CompressionConfig
from lightning_compress.hook import get_compression_state, register_compression
from lightning_compress.momentum import attach_optimizer
from lightning_compress.state import CompressionState

__all__ = ["CompressionCheckpoint", "enable"]

log = logging.getLogger(__name__)

_REGISTERED = "_accelerate_compress_checkpointed"  # ids of states an Accelerator already checkpoints
STATS_ENV_VAR = "ACCELERATE_COMPRESSION_STATS"  # a folder: each rank writes rank<r>.json with its stats at exit
_ENABLED: list[CompressionState] = []  # for the exit report (CompressionState has __slots__, no weakrefs)


def _find_ddp(model: Any) -> DistributedDataParallel | None:
    """The DDP module inside ``model`` (itself, or under ``torch.compile``'s ``_orig_mod``)."""
    seen = 0
    while model is not None and seen < 4:
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
        seen += 1
    return None


def _as_config(config: CompressionConfig | Mapping[str, Any] | str | None) -> CompressionConfig | None:
    if config is None:
        return config_from_env()
    if isinstance(config, CompressionConfig):
        return config
    if isinstance(config, str):
        from accelerate_compress.flag import parse_setting

        return resolve(parse_setting(config))
    if isinstance(config, Mapping):
        return resolve(config)
    raise TypeError(f"`config` must be a CompressionConfig, a dict or a 'key=value,...' string; got {type(config)}")


class CompressionCheckpoint:
    """What ``Accelerator.register_for_checkpointing`` stores for one :class:`CompressionState`.

    Accelerate calls ``state_dict()`` on every rank but writes only the main process's result,
    so ``state_dict()`` gathers every rank's memory (a collective: all ranks call ``save_state``
    together, as Accelerate requires). ``load_state_dict()`` gives each rank its own back.
    """

    def __init__(self, state: CompressionState):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        state = self.state
        sd = state.state_dict()
        # CPU copies: a pickled CUDA tensor would unpickle on the sender's device.
        sd["memory"] = {n: {k: t.cpu() for k, t in m.items()} for n, m in sd["memory"].items()}
        sd["server_memory"] = {n: t.cpu() for n, t in sd["server_memory"].items()}
        sd["velocity"] = {n: t.cpu() for n, t in sd["velocity"].items()}
        if state.world_size > 1 and dist.is_available() and dist.is_initialized():
            # all_gather (not gather): with save_on_each_node every local main process writes the file.
            gathered: list[Any] = [None] * state.world_size
            dist.all_gather_object(gathered, sd, group=state.process_group)
        else:
            gathered = [sd]
        return {"format": 1, "world_size": state.world_size, "config": state.config.to_dict(), "ranks": gathered}

    def load_state_dict(self, blob: Mapping[str, Any]) -> None:
        state, ranks = self.state, blob["ranks"]
        if int(blob["world_size"]) != state.world_size:
            warnings.warn(
                f"accelerate_compress: the checkpoint holds compression state for {blob['world_size']} ranks but this "
                f"run has {state.world_size}; residuals and shifts start from zero (not bit-for-bit).",
                UserWarning,
                stacklevel=2,
            )
        log.debug("accelerate_compress: restoring compression state of rank %d", state.rank)
        state.load_state_dict(ranks[min(state.rank, len(ranks) - 1)])


def _adaptive(config: Any, adaptive: Any) -> dict[str, Any] | None:
    """GraVAC keyword arguments asked for by ``adaptive`` or, when it is ``None``, by ``config``/the environment."""
    if adaptive is not None:
        if adaptive == "none":
            return None
        if adaptive == "gravac":
            return adaptive_options({"adaptive": "gravac"})
        if isinstance(adaptive, Mapping):
            return adaptive_options({"adaptive": "gravac", "gravac": dict(adaptive)})
        raise ValueError(f"`adaptive` must be 'none', 'gravac' or a dict of GraVAC parameters; got {adaptive!r}")
    if config is None:
        return adaptive_from_env()
    if isinstance(config, str):
        from accelerate_compress.flag import parse_setting

        return adaptive_options(parse_setting(config))
    if isinstance(config, Mapping):
        return adaptive_options(config)
    return None


def enable(
    accelerator: Any,
    model: Any,
    config: CompressionConfig | Mapping[str, Any] | str | None = None,
    adaptive: str | Mapping[str, Any] | None = None,
) -> CompressionState | None:
    """Turn on compressed, error-compensated gradient exchange for a model returned by ``accelerator.prepare``.

    Registers the compression hook on the DDP-wrapped model and registers its state with
    ``accelerator.register_for_checkpointing``, so ``save_state``/``load_state`` restore every rank's
    own memory and a resumed run continues exactly. Works with ``accelerator.accumulate()``: the hook
    runs on synchronizing backward passes only, once per optimizer step. Calling it again on the same
    model (or after ``accelerate-compress launch`` enabled it) returns the existing state.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``.
        model: the prepared model (``DistributedDataParallel`` when there are several processes).
        config: a :class:`~lightning_compress.CompressionConfig`, a dict, an inline ``"k=v,..."`` string or a YAML
            path; ``None`` reads ``ACCELERATE_COMPRESSION`` (unset or empty: the config defaults).
        adaptive: ``"gravac"`` or a dict of GraVAC parameters to let GraVAC choose the compression factor
            (:mod:`lightning_compress.gravac`), ``"none"`` for a fixed one; ``None`` takes what ``config`` (or
            the environment) says with ``adaptive=gravac`` and ``gravac_*`` options. The controller's state is
            saved and restored with the compression state.

    Returns:
        The :class:`~lightning_compress.CompressionState`, or ``None`` on a single process (nothing to exchange).

    Raises:
        RuntimeError: several processes but ``model`` is not DDP-wrapped, or Accelerate's own ``comm_hook`` is set.
        ValueError, TypeError: an invalid compression setting.

    Example::

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        state = accelerate_compress.enable(accelerator, model, "compressor=sign,feedback=doublesqueeze")
    """
    ddp = _find_ddp(model)
    existing = get_compression_state(ddp) if ddp is not None else None
    if existing is not None:
        if config is not None and _as_config(config) != existing.config:
            warnings.warn(
                f"accelerate_compress: compression is already enabled on this model with {existing.config}; "
                "the config passed to enable() is ignored (a DDP model takes one comm hook).",
                UserWarning,
                stacklevel=2,
            )
        _register_checkpointing(accelerator, existing)
        return existing
    resolved = _as_config(config) or CompressionConfig()
    gravac = _adaptive(config, adaptive)
    if ddp is None:
        if getattr(accelerator, "num_processes", 1) > 1:
            raise RuntimeError(
                f"accelerate_compress.enable needs the DistributedDataParallel model that accelerator.prepare returns; "
                f"got {type(model).__name__}. Call enable() after `model = accelerator.prepare(model)` (DDP only: "
                "FSDP, DeepSpeed and Megatron-LM are not supported)."
            )
        log.info("accelerate_compress: single process, nothing to exchange; compression (%s) not enabled", resolved)
        return None
    handler = getattr(accelerator, "ddp_handler", None)
    hook = getattr(handler, "comm_hook", None)
    if hook is not None and str(getattr(hook, "value", hook)).lower() != "no":
        raise RuntimeError(
            f"accelerate_compress: Accelerate's own DDP comm hook ({hook}) is set in DistributedDataParallelKwargs; "
            "a DDP model takes one comm hook. Drop `comm_hook` from DistributedDataParallelKwargs to use compression."
        )
    state = register_compression(ddp, resolved, process_group=ddp.process_group)
    if gravac is not None:
        attach_gravac(state, **gravac)
    attach_prepared_optimizer(accelerator, state)
    _register_checkpointing(accelerator, state)
    _follow_loss_scale(getattr(accelerator, "scaler", None), state)
    if not _ENABLED:
        atexit.register(_report)
    _ENABLED.append(state)
    return state


def attach_prepared_optimizer(accelerator: Any, state: CompressionState) -> None:
    """Move the momentum of the optimizer ``accelerator`` prepared for ``state``'s model into the exchange.

    Looks at the optimizers prepared so far and takes the one whose parameters are the model's
    (``Accelerator.prepare`` prepares models before optimizers; the launcher's instrumentation
    calls this again after each optimizer is prepared). Does nothing once one is attached.
    """
    if state.momentum is not None:
        return
    own = set(state.param_names)
    found = []
    for wrapped in getattr(accelerator, "_optimizers", []):
        optimizer = getattr(wrapped, "optimizer", wrapped)
        if any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            found.append(optimizer)
    if len(found) == 1:
        attach_optimizer(state, found[0])
    elif len(found) > 1 and state.config.momentum in ("lookahead", "heavy_ball"):
        raise ValueError(
            f"`momentum={state.config.momentum!r}` moves one optimizer's momentum into the exchange; this model is "
            f"trained by {len(found)} optimizers. Use `momentum='optimizer'` (or 'auto', which then keeps it)."
        )


def _follow_loss_scale(scaler: Any, state: CompressionState) -> None:
    """Keep memory in the units of the next backward when a GradScaler (fp16) changes its scale."""
    if scaler is None or not callable(getattr(scaler, "update", None)) or getattr(scaler, _REGISTERED, False):
        return
    update = scaler.update

    def update_and_rescale(*args: Any, **kwargs: Any) -> Any:
        # Memory holds loss-scaled gradients: without this, every growth or overflow skip would poison it.
        enabled = scaler.is_enabled() if hasattr(scaler, "is_enabled") else True
        before = scaler.get_scale() if enabled else None
        out = update(*args, **kwargs)
        if before:
            after = scaler.get_scale()
            if after != before:
                log.debug("accelerate_compress: loss scale %s -> %s, rescaling compression memory", before, after)
                state.rescale_memory(after / before)
        return out

    scaler.update = update_and_rescale
    setattr(scaler, _REGISTERED, True)


def _report() -> None:
    """At exit: one summary line on rank 0; per-rank stats files when ``ACCELERATE_COMPRESSION_STATS`` is set."""
    folder = os.environ.get(STATS_ENV_VAR, "").strip()
    for i, state in enumerate(_ENABLED):
        s = state.stats
        if folder:
            os.makedirs(folder, exist_ok=True)
            record = {**s.as_dict(), "step": state.step, "rank": state.rank, "config": state.config.to_dict(),
                      "momentum": state.momentum.mode if state.momentum is not None else None}  # fmt: skip
            if state.adaptive is not None:
                record["adaptive"] = state.adaptive.controller.state_dict()
            suffix = f"_{i}" if i else ""
            with open(os.path.join(folder, f"rank{state.rank}{suffix}.json"), "w", encoding="utf-8") as handle:
                json.dump(record, handle)
        if state.rank == 0 and s.steps:
            print(
                f"accelerate-compress: {state.config.compressor}/{state.config.feedback} on {state.world_size} ranks, "
                f"{s.steps} synchronized steps, {s.ratio_total:.1f}x fewer bytes sent than dense DDP "
                f"({s.sent_bytes_total / s.steps:.0f} B per step per rank)"
                + (f"; GraVAC: {state.adaptive.controller!r}" if state.adaptive is not None else ""),
                file=sys.stderr,
                flush=True,
            )


def _register_checkpointing(accelerator: Any, state: CompressionState) -> None:
    done = accelerator.__dict__.setdefault(_REGISTERED, set())
    if id(state) in done or not hasattr(accelerator, "register_for_checkpointing"):
        return
    accelerator.register_for_checkpointing(CompressionCheckpoint(state))
    done.add(id(state))
