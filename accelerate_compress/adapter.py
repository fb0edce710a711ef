"""``enable()``: compressed gradient exchange on a model prepared by an ``accelerate.Accelerator``."""

from __future__ import annotations

import atexit
import json
import logging
import os
import warnings
from typing import Any, Mapping

from torch.nn.parallel import DistributedDataParallel

from accelerate_compress.flag import adaptive_from_env, adaptive_options, config_from_env, resolve
from lightning_compress import integration, report
from lightning_compress.adaptive import attach_gravac
from lightning_compress.config import MOVING_MODES, CompressionConfig, build_config
from lightning_compress.hook import get_compression_state, register_compression
from lightning_compress.momentum import attach_optimizer
from lightning_compress.state import CompressionState

__all__ = ["CompressionCheckpoint", "enable"]

log = logging.getLogger(__name__)

_REGISTERED = "_accelerate_compress_checkpointed"  # ids of states an Accelerator already checkpoints
STATS_ENV_VAR = "ACCELERATE_COMPRESSION_STATS"  # a folder: each rank writes rank<r>.json with its stats at exit
_ENABLED: list[CompressionState] = []  # for the exit report (CompressionState has __slots__, no weakrefs)
TOOL = "accelerate-compress"  # the start and end lines read "accelerate-compress: ..."
_TABLES: dict[int, Any] = {}  # id(state) -> its DDP model, for the per-tensor table at exit
_LAST_ROWS: dict[int, list] = {}  # id(state) -> the per-tensor view of the last step that logged it


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
    if isinstance(config, str):  # the flag's grammar: inline "k=v,..." (with GraVAC keys) or a YAML file
        from accelerate_compress.flag import parse_setting

        return resolve(parse_setting(config))
    if isinstance(config, Mapping):
        return resolve(config)
    return build_config(config)  # a CompressionConfig as it is, or the TypeError naming what is accepted


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
        sd = integration.rank_state_dict(state)  # CPU copies: a pickled CUDA tensor would unpickle on the sender's device
        # all_gather (not gather): with save_on_each_node every local main process writes the file.
        gathered = integration.gather_ranks(state, sd, everywhere=True)
        return integration.checkpoint_blob(state, gathered)

    def load_state_dict(self, blob: Mapping[str, Any]) -> None:
        state = self.state
        if integration.saved_world_size(blob) != state.world_size:
            warnings.warn(
                f"accelerate_compress: the checkpoint holds compression state for {blob['world_size']} ranks but this "
                f"run has {state.world_size}; residuals and shifts start from zero (not bit-for-bit).",
                UserWarning,
                stacklevel=2,
            )
        log.debug("accelerate_compress: restoring compression state of rank %d", state.rank)
        integration.load_own_rank(state, blob)


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
    log_layers_every_n_steps: int | None = None,
    layer_table: bool = False,
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
        log_layers_every_n_steps: every N-th step, also log each tensor's ratio, bytes sent and gain
            (``compression/layer/<tensor>/...``); ``None`` (default) for none.
        layer_table: print the per-tensor table at exit (rank 0): gains from the gradients still there, else
            from the last step that logged per-tensor metrics.

    Rank 0 prints one line with the settings that run and the bytes a step is expected to send against
    dense DDP, and a summary line at exit. When ``accelerator.init_trackers`` has set up trackers
    (TensorBoard, CSV, ...), every optimizer step logs ``compression/ratio``, ``compression/bytes_sent``,
    ``compression/bytes_sent_total``, ``compression/dense_bytes``, ``compression/gain`` (and GraVAC's
    ``gravac/*``) through ``accelerator.log``. On one process nothing is exchanged: a warning says so.

    Returns:
        The :class:`~lightning_compress.CompressionState`, or ``None`` on a single process (nothing to exchange;
        a warning says so).

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
        if log_layers_every_n_steps is not None or layer_table:  # asked for now: the per-tensor view is added
            _log_through_trackers(accelerator, existing, ddp, log_layers_every_n_steps)
            if layer_table:
                _TABLES[id(existing)] = ddp
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
        _warn_not_distributed(accelerator, resolved)
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
    _log_through_trackers(accelerator, state, ddp, log_layers_every_n_steps)
    if layer_table:
        _TABLES[id(state)] = ddp
    if state.rank == 0:
        theta_min = None if state.adaptive is None else state.adaptive.controller.theta_min
        params = [(n, p.shape, p.element_size()) for n, p in ddp.module.named_parameters() if p.requires_grad]
        line = report.start_line(TOOL, state.config, params, state.world_size, theta_min, state.transport)
        report.report_logger.info(line)
    if not _ENABLED:
        atexit.register(_report)
    _ENABLED.append(state)
    return state


def _warn_not_distributed(accelerator: Any, config: CompressionConfig) -> None:
    """One process: nothing is exchanged, so nothing is compressed. Say so, and why when it looks unintended."""
    started = int(os.environ.get("WORLD_SIZE", "1") or 1)
    kind = getattr(getattr(accelerator, "distributed_type", None), "value", getattr(accelerator, "distributed_type", "NO"))
    if started > 1:
        why = (
            f"{started} processes were started (WORLD_SIZE={started}) but Accelerate runs each one alone "
            f"(distributed_type={kind}, num_processes=1): they train independently, and no gradients are exchanged. "
            "On a machine without GPUs use `accelerate-compress launch --cpu --num_processes N` (or `use_cpu: true` "
            "in the config file)."
        )
    else:
        why = f"this run has one process (distributed_type={kind}): there is no gradient exchange."
    warnings.warn(
        f"accelerate_compress: compression ({report.settings_text(config)}) is NOT enabled: {why} "
        "Training runs densely, as it would without accelerate_compress.",
        UserWarning,
        stacklevel=3,
    )


def _log_through_trackers(accelerator: Any, state: CompressionState, ddp: Any, layers_every: int | None) -> None:
    """After every synchronizing backward, the step's metrics go to ``accelerator.log`` when trackers are set up.

    The hook closes a step inside the backward pass, so ``accelerator.backward`` returning with a new step
    count is the point to log it (one log per optimizer step, under ``accumulate()`` too).
    """
    if layers_every is not None and (isinstance(layers_every, bool) or not isinstance(layers_every, int) or layers_every < 1):
        raise ValueError(f"`log_layers_every_n_steps` must be an int >= 1 or None; got {layers_every!r}")
    backward = accelerator.backward
    if getattr(backward, "_accelerate_compress", None) is not None:
        watched = backward._accelerate_compress
        every = watched[id(state)][2] if layers_every is None and id(state) in watched else layers_every
        watched[id(state)] = (state, ddp, every)
        return
    watched = {id(state): (state, ddp, layers_every)}
    logged: dict[int, int] = {}

    def backward_and_log(*args: Any, **kwargs: Any) -> Any:
        out = backward(*args, **kwargs)
        if getattr(accelerator, "trackers", None):
            for st, model, every in watched.values():
                if st.stats.steps and logged.get(id(st)) != st.stats.steps:
                    logged[id(st)] = st.stats.steps
                    accelerator.log(step_values(st, model, every), step=st.step)
        return out

    backward_and_log._accelerate_compress = watched  # type: ignore[attr-defined]
    accelerator.backward = backward_and_log


def step_values(state: CompressionState, ddp: Any = None, layers_every: int | None = None) -> dict[str, float]:
    """The metrics of the last step: ``compression/*`` (and ``gravac/*``, and every ``layers_every`` steps
    ``compression/layer/<tensor>/*``), the names the Lightning monitor logs."""
    values = report.step_metrics(state)
    if state.adaptive is not None:
        values.update(report.gravac_metrics(state.adaptive))
    if ddp is not None and layers_every is not None and state.stats.steps % layers_every == 0:
        rows = _LAST_ROWS[id(state)] = report.layer_rows(state, ddp.module.named_parameters())
        values.update(report.layer_metrics(rows))
    return values


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
        scaler = getattr(accelerator, "scaler", None)
        attach_optimizer(state, found[0], loss_scaled=integration.current_scale(scaler) is not None)
    elif len(found) > 1 and state.config.momentum in MOVING_MODES:
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
        before = integration.current_scale(scaler)
        out = update(*args, **kwargs)
        if before:
            integration.follow_loss_scale(state, before, scaler.get_scale(), _say_rescale)
        return out

    scaler.update = update_and_rescale
    setattr(scaler, _REGISTERED, True)


def _say_rescale(before: float, after: float) -> None:
    log.debug("accelerate_compress: loss scale %s -> %s, rescaling compression memory", before, after)


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
            line = report.end_line(TOOL, state)
            if state.adaptive is not None:
                line += f"; GraVAC: {state.adaptive.controller!r}"
            report.report_logger.info(line)
            if id(state) in _TABLES:
                rows = report.layer_rows(state, _TABLES[id(state)].module.named_parameters())
                if all(r.gain is None for r in rows) and id(state) in _LAST_ROWS:  # gradients already cleared
                    rows = _LAST_ROWS[id(state)]
                report.report_logger.info(report.layer_table(rows, TOOL))


def _register_checkpointing(accelerator: Any, state: CompressionState) -> None:
    done = accelerator.__dict__.setdefault(_REGISTERED, set())
    if id(state) in done or not hasattr(accelerator, "register_for_checkpointing"):
        return
    accelerator.register_for_checkpointing(CompressionCheckpoint(state))
    done.add(id(state))
