"""The compression side of the ``compressed_ddp`` strategies, shared by the Trainer and Fabric ones.

:class:`_CompressionCore` holds the config, registers the hook on the DDP model, attaches the optimizer,
prints the start and end lines, and saves, restores and rescales the state; the strategies in
:mod:`lightning_compress.strategy` and :mod:`lightning_compress.fabric` call it from their lifecycle
methods. It imports no Lightning (``lightning_utilities`` only, for rank-zero warnings).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress import integration, report
from lightning_compress.config import MOVING_MODES, CompressionConfig
from lightning_compress.hook import register_compression
from lightning_compress.momentum import attach_optimizer
from lightning_compress.state import CompressionState

__all__ = ["_CompressionCore"]

# The strategies' logger: what a strategy logs goes under its module's name.
log = logging.getLogger("lightning_compress.strategy")


class _CompressionCore:
    """Framework-neutral compression bookkeeping of a strategy (Trainer and Fabric)."""

    def _init_compression(
        self,
        compression: Any,
        options: dict[str, Any],
        save_compression_memory: bool,
        log_compression_stats: bool,
        ddp_kwargs: dict[str, Any],
    ) -> None:
        integration.check_ddp_keywords(type(self).__name__, ddp_kwargs)
        integration.refuse_comm_hooks(type(self).__name__, ddp_kwargs)
        if not isinstance(save_compression_memory, bool):
            raise TypeError(f"`save_compression_memory` must be bool; got {save_compression_memory!r}")
        self._compression = integration.build_config(compression, **integration.given_options(compression, options))
        self._save_compression_memory = save_compression_memory
        self._log_compression_stats = log_compression_stats
        self._compression_state: CompressionState | None = None
        self._compressed_module: Any = None
        self._hook_active = False
        self._loaded_compression: dict[str, Any] | None = None
        self._started_at_step: int | None = None  # stats.steps when the start line was printed

    # ----- public -----------------------------------------------------------------------------
    @property
    def compression_config(self) -> CompressionConfig:
        """The :class:`CompressionConfig` that runs: the one this strategy registers, and once registered the
        state's (a controller's ``density``/``bits`` restored from a checkpoint included)."""
        state = self._compression_state
        return state.config if state is not None else self._compression

    @property
    def compressed_module(self) -> Any:
        """The module DDP wraps (the state's parameter names are its names) once registered; else ``None``."""
        return self._compressed_module

    @property
    def compression_state(self) -> CompressionState | None:
        """This rank's :class:`CompressionState` (stats, memory) once the DDP model is wrapped; else ``None``."""
        return self._compression_state

    # ----- lifecycle --------------------------------------------------------------------------
    def _add_monitor(self, trainer: Any) -> None:
        if not self._log_compression_stats or self._monitor_cls is None:
            return
        if not any(isinstance(cb, self._monitor_cls) for cb in trainer.callbacks):
            log.debug(f"{type(self).__name__}: adding {self._monitor_cls.__name__}")
            trainer.callbacks.append(self._monitor_cls())

    def _register_compression_hook(self, model: Any) -> CompressionState:
        # Stock DDP strategies register comm hooks on CUDA only; compressed exchange must run on gloo too.
        log.debug(f"{type(self).__name__}: registering compressed gradient exchange ({self._compression})")
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(f"{type(self).__name__}: expected a DistributedDataParallel model to register on")
        self._compression_state = register_compression(
            model, self._compression, process_group=self._ddp_kwargs.get("process_group")
        )
        self._compressed_module = model.module
        self._hook_active = True
        self._apply_loaded_compression()
        state = self._compression_state
        if state.world_size == 1:
            rank_zero_warn(
                f"lightning_compress: {type(self).__name__} runs on 1 process: there is no gradient exchange, so "
                "compression saves no bytes (nothing is sent). The compressor and its error feedback still run and "
                "change training as they would on several processes. Compression pays with several processes "
                "(devices > 1 or num_nodes > 1); for one, a single-device strategy does the same work without it."
            )
        return state

    def _say_start(self, model: Any, gravac_theta_min: float | None = None) -> None:
        """Rank 0 prints the settings that run and the bytes a step is expected to send (several processes only)."""
        state = self._compression_state
        if state is None or self._started_at_step is not None:
            return
        self._started_at_step = state.stats.steps
        if state.rank != 0 or state.world_size == 1:
            return
        module = getattr(model, "module", model)
        params = [(n, p.shape, p.element_size()) for n, p in module.named_parameters() if p.requires_grad]
        report.report_logger.info(
            report.start_line("lightning-compress", state.config, params, state.world_size, gravac_theta_min,
                              None if gravac_theta_min is not None else state.transport)  # fmt: skip
        )

    def _say_end(self) -> None:
        """Rank 0 prints the run's summary when this run took steps (several processes only)."""
        state, started = self._compression_state, self._started_at_step
        self._started_at_step = None
        if state is None or started is None or state.stats.steps <= started:
            return
        if state.rank == 0 and state.world_size > 1:
            report.report_logger.info(report.end_line("lightning-compress", state))

    def _attach_optimizers(self, optimizers: list[Any]) -> None:
        """Move the (single) optimizer's momentum into the exchange, as ``config.momentum`` says."""
        state = self._compression_state
        if state is None or state.momentum is not None or not optimizers:
            return
        unwrapped = [getattr(o, "optimizer", o) for o in optimizers]  # LightningOptimizer, _FabricOptimizer
        if len(unwrapped) > 1:
            if state.config.momentum in MOVING_MODES:
                raise ValueError(
                    f"`momentum={state.config.momentum!r}` moves one optimizer's momentum into the exchange; this run "
                    f"has {len(unwrapped)} optimizers. Use `momentum='optimizer'` (or 'auto', which then keeps it)."
                )
            log.info("lightning_compress: %d optimizers; their momentum stays in them", len(unwrapped))
            return
        attach_optimizer(state, unwrapped[0], loss_scaled=self._loss_scaled())

    def _loss_scaled(self) -> bool:
        """Whether a loss scaler (fp16 ``GradScaler``) scales the gradients the exchange sees."""
        precision = getattr(self, "precision_plugin", None) or getattr(self, "precision", None)
        return integration.current_scale(getattr(precision, "scaler", None)) is not None

    def _detach_optimizers(self) -> None:
        state = self._compression_state
        if state is not None and state.momentum is not None:
            state.momentum.detach()

    def _apply_loaded_compression(self) -> None:
        blob, state = self._loaded_compression, self._compression_state
        if blob is None or state is None:
            return
        self._loaded_compression = None
        saved_world = integration.saved_world_size(blob)
        if saved_world != state.world_size:
            rank_zero_warn(
                f"lightning_compress: the checkpoint holds compression state for {saved_world} ranks but this run has "
                f"{state.world_size}; step and settings are restored, residuals and shifts start from zero "
                "(training continues, but not bit-for-bit)."
            )
        log.debug(f"{type(self).__name__}: restoring compression state of rank {state.rank}")
        integration.load_own_rank(state, blob)

    def _gather_compression(self) -> dict[str, Any] | None:
        """Every rank's state on rank 0, as the checkpoint holds it (``None`` on the other ranks); a collective."""
        state = self._compression_state
        if state is None:
            return None
        sd = integration.rank_state_dict(state, keep_memory=self._save_compression_memory)
        gathered = integration.gather_ranks(state, sd, everywhere=False)
        if state.rank != 0:
            return None
        return integration.checkpoint_blob(state, gathered, memory_saved=self._save_compression_memory)

    def _stash_loaded_compression(self, blob: dict[str, Any] | None) -> None:
        """Keep a checkpoint's compression state until the hook is registered; apply it now if it is."""
        self._loaded_compression = blob
        if self._hook_active:  # strategies that restore after setup
            self._apply_loaded_compression()

    def _follow_loss_scale(self, scaler: Any, before: float | None) -> None:
        """After an optimizer step: rescale the memory if the step changed the loss scale (fp16)."""
        if before is not None and self._compression_state is not None:
            integration.follow_loss_scale(self._compression_state, before, scaler.get_scale(), _say_rescale)

    def _end_compression(self) -> None:
        """At teardown: the end line, and the hook's links dropped (the state stays for inspection)."""
        self._say_end()
        self._loaded_compression = None
        self._hook_active = False
        self._detach_optimizers()


def _say_rescale(before: float, after: float) -> None:
    log.debug(f"lightning_compress: loss scale changed, rescaling compression memory by {after / before}")
