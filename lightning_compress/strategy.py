"""``CompressedDDPStrategy``: Lightning's DDP with compressed, error-compensated gradient exchange.

Importing this module (``import lightning_compress`` does) registers the strategy names
``compressed_ddp``, ``compressed_ddp_spawn``, ``compressed_ddp_fork`` and ``compressed_ddp_notebook``
in ``lightning.pytorch``'s strategy registry and, when installed, in ``pytorch_lightning``'s.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal, Mapping, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from lightning_compress import fabric as _fabric  # noqa: F401  (registers the Fabric names with this module's)
from lightning_compress.callbacks import CompressionMonitor, _GraVACMixin, _make_pytorch_lightning_monitor
from lightning_compress.config import CompressionConfig
from lightning_compress.integration import (
    CHECKPOINT_KEY,
    CompressorName,
    FeedbackName,
    MomentumMode,
    TransportName,
    build_config,
    config_options,
    current_scale,
    register_names,
)
from lightning_compress.strategy_base import _CompressionCore

__all__ = ["CHECKPOINT_KEY", "CompressedDDPStrategy", "CompressedDDPStrategyPL", "build_config"]

log = logging.getLogger(__name__)

# DistributedDataParallel's defaults of the options the Trainer strategy names in its signature.
_DDP_DEFAULTS = dict(find_unused_parameters=False, static_graph=False, gradient_as_bucket_view=False,
                     bucket_cap_mb=None, broadcast_buffers=True)  # fmt: skip


class _CompressedDDPMixin(_CompressionCore):
    """Trainer-side overrides (shared by the ``lightning`` and ``pytorch_lightning`` twins)."""

    _monitor_cls: type | None = None

    def __init__(
        self,
        compression: CompressionConfig | Mapping[str, Any] | str | None = None,
        *,
        compressor: CompressorName = "sign",
        density: float = 0.01,
        bits: int = 8,
        feedback: FeedbackName = "ef",
        transport: TransportName = "auto",
        warmup_steps: int = 0,
        density_warmup_steps: Optional[int] = None,
        min_numel: int = 1024,
        block_size: Optional[int] = None,
        seed: int = 0,
        diana_alpha: Optional[float] = None,
        ef21_step: Optional[float] = None,
        dgc_sample_fraction: float = 0.01,
        momentum: MomentumMode = "auto",
        powersgd_rank: int = 4,
        hierarchical: bool = False,
        ranks_per_node: int = 0,
        save_compression_memory: bool = True,
        log_compression_stats: bool = True,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: Optional[float] = None,
        broadcast_buffers: bool = True,
        **kwargs: Any,
    ) -> None:
        options = config_options(locals())  # the CompressionConfig fields among the arguments
        # The common DDP options are named (tools read them); the others pass through `kwargs`. Only values off
        # DDP's defaults are handed on. `ddp_kwargs` is a new dict on purpose: LightningCLI follows a `**kwargs`
        # handed to the parent into DDPStrategy's signature, and would offer (and pass) `ddp_comm_hook` and
        # `model_averaging_period`, which this strategy refuses.
        named = dict(find_unused_parameters=find_unused_parameters, static_graph=static_graph,
                     gradient_as_bucket_view=gradient_as_bucket_view, bucket_cap_mb=bucket_cap_mb,
                     broadcast_buffers=broadcast_buffers)  # fmt: skip
        ddp_kwargs = {**{k: v for k, v in named.items() if v != _DDP_DEFAULTS[k]}, **kwargs}
        # Validate before DDPStrategy stores anything: bad options fail here, before any process starts.
        self._init_compression(compression, options, save_compression_memory, log_compression_stats, ddp_kwargs)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        log.debug(f"{type(self).__name__}: {self._compression}")

    @override
    def setup(self, trainer: Any) -> None:
        self._add_monitor(trainer)
        super().setup(trainer)
        self._attach_optimizers(self.optimizers)
        if trainer.state.fn == "fit":
            self._say_start(self.model, _gravac_theta_min(trainer, self.compression_config))

    @override
    def _register_ddp_hooks(self) -> None:
        self._register_compression_hook(self.model)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        scaler = getattr(self.precision_plugin, "scaler", None)
        before = current_scale(scaler)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._follow_loss_scale(scaler, before)
        return output

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        # Called on every rank. A weights-only dump has no "optimizer_states" and skips the state;
        # the decision is the same on all ranks, so they all join the gather or none does.
        if self._compression_state is not None and "optimizer_states" in checkpoint:
            log.debug(f"{type(self).__name__}: gathering compression state of all ranks")
            blob = self._gather_compression()
            if blob is not None:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: blob}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        # DDP restores before setup: stash the state and apply it when the hook is registered.
        blob = checkpoint.get(CHECKPOINT_KEY)
        if blob is not None:
            log.debug(f"{type(self).__name__}: compression state found in {checkpoint_path}")
        self._stash_loaded_compression(blob)
        return checkpoint

    @override
    def teardown(self) -> None:
        log.debug(f"{type(self).__name__}: tearing down (compression state kept for inspection)")
        self._end_compression()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_names(cls, strategy_registry, _CLASS_PATHS)


#: The class paths LightningCLI may hand over as strings.
_CLASS_PATHS = ("lightning_compress.CompressedDDPStrategy", "lightning_compress.strategy.CompressedDDPStrategy")


def _gravac_theta_min(trainer: Any, config: CompressionConfig) -> float | None:
    """The factor a GraVAC callback among the trainer's starts at; ``None`` without one."""
    for cb in trainer.callbacks:
        if isinstance(cb, _GraVACMixin):
            if cb.theta_min is not None:
                return float(cb.theta_min)
            return 32.0 / 9.0 if config.compressor == "qsgd" else 10.0
    return None


class CompressedDDPStrategy(_CompressedDDPMixin, DDPStrategy):
    """Lightning's DDP strategy with compressed, error-compensated gradient exchange (CPU/gloo and CUDA/NCCL).

    Every :class:`~lightning_compress.CompressionConfig` field is a keyword with the config's default;
    ``compression`` gives a base config (object, dict or ``"key=value,..."``) that the keywords set to
    something other than their default override. All other keywords go to
    :class:`~lightning.pytorch.strategies.DDPStrategy`. Checkpoints hold every rank's compression state under
    ``checkpoint["lightning_compress"]``, and ``fit(ckpt_path=...)`` gives each rank its own back, so a
    resumed run continues bit for bit.

    At the start of ``fit`` rank 0 prints one line with the settings that run and the bytes a step is
    expected to send against dense DDP, and at the end one summary line (steps, bytes, mean gain, time
    in the exchange); both go to the ``lightning_compress.report`` logger. On a single process there is
    nothing to exchange: a warning says so and no saving is announced.

    Args:
        compression: base settings; ``None`` for the defaults.
        save_compression_memory: keep residuals/shifts in checkpoints. They cost about
            world_size x model size x (1-2) fp32 tensors on rank 0 and in the file; with ``False`` only step,
            settings and stats are kept and resumed runs start with fresh memory.
        log_compression_stats: add a :class:`~lightning_compress.CompressionMonitor`
            (ratio, bytes sent, gain per step) unless one is already among the callbacks.
        compressor, density, bits, feedback, transport, warmup_steps, density_warmup_steps, min_numel, block_size,
            seed, diana_alpha, ef21_step, dgc_sample_fraction, momentum, powersgd_rank, hierarchical, ranks_per_node: the
            :class:`~lightning_compress.CompressionConfig` fields.

    Raises:
        ValueError: a compression option is invalid, or ``ddp_comm_hook``/``ddp_comm_state``/``ddp_comm_wrapper``
            is given (this strategy registers its own hook).
        TypeError: a compression option has the wrong type, or a keyword is neither a compression option nor
            one of DistributedDataParallel's (the message names the closest option).

    Example::

        >>> strategy = CompressedDDPStrategy(compressor="topk", density=0.01, feedback="ef21")
        >>> strategy.compression_config.transport_resolved
        'allgather'
    """

    _monitor_cls = CompressionMonitor


CompressedDDPStrategy.register_strategies(StrategyRegistry)


def _make_pytorch_lightning_strategy() -> type | None:
    """The same strategy for the standalone ``pytorch_lightning`` package (its classes are distinct)."""
    try:
        import pytorch_lightning.strategies as pls
    except ImportError:
        return None

    body: dict[str, Any] = {"__doc__": CompressedDDPStrategy.__doc__}
    body["_monitor_cls"] = _make_pytorch_lightning_monitor()
    body["__module__"] = __name__
    cls = type("CompressedDDPStrategyPL", (_CompressedDDPMixin, pls.DDPStrategy), body)
    cls.register_strategies(pls.StrategyRegistry)
    return cls


CompressedDDPStrategyPL = _make_pytorch_lightning_strategy()

