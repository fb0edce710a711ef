"""``CompressedDDPStrategy`` for Lightning Fabric: ``Fabric(strategy="compressed_ddp")``.

Importing this module (``import lightning_compress`` does, through :mod:`lightning_compress.strategy`)
registers ``compressed_ddp``, ``compressed_ddp_spawn``, ``compressed_ddp_fork`` and ``compressed_ddp_notebook``
in ``lightning.fabric``'s strategy registry. ``fabric.save`` of a training state (one holding an optimizer)
carries every rank's compression state, and ``fabric.load`` gives each rank its own back.
"""

from __future__ import annotations

import logging
import multiprocessing.util
from datetime import timedelta
from typing import Any, Literal, Mapping, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress.config import CompressionConfig
from lightning_compress.integration import (
    CHECKPOINT_KEY,
    CompressorName,
    FeedbackName,
    MomentumMode,
    TransportName,
    config_options,
    current_scale,
    register_names,
)
from lightning_compress.strategy_base import _CompressionCore

__all__ = ["CompressedDDPStrategy"]

log = logging.getLogger(__name__)


class CompressedDDPStrategy(_CompressionCore, DDPStrategy):
    """Fabric's DDP strategy with compressed, error-compensated gradient exchange (CPU/gloo and CUDA/NCCL).

    Takes the same compression keywords as :class:`lightning_compress.strategy.CompressedDDPStrategy`
    (every :class:`~lightning_compress.CompressionConfig` field, ``compression=``, ``save_compression_memory``)
    plus Fabric's ``DDPStrategy`` arguments. ``fabric.save(path, state)`` adds every rank's compression state
    under ``"lightning_compress"`` when ``state`` holds an optimizer (a training checkpoint); ``fabric.load``
    restores each rank's own, before or after ``fabric.setup``.

    ``fabric.setup`` prints (rank 0) one line with the settings that run and the bytes a step is expected
    to send against dense DDP, and the process prints a summary line when it ends; on a single process a
    warning says that nothing is exchanged. To log the per-step metrics through ``fabric.log_dict``, add
    ``callbacks=[lightning_compress.CompressionMonitor()]`` to a Fabric that has loggers.

    Raises:
        ValueError: a compression option is invalid, or a ``ddp_comm_*`` argument is given.
        TypeError: a compression option has the wrong type, or a keyword is neither a compression option nor
            one of DistributedDataParallel's (the message names the closest option).

    Example::

        >>> CompressedDDPStrategy(compressor="sign", feedback="doublesqueeze").compression_config.transport_resolved
        'two_pass'
    """

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
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision: Any = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        options = config_options(locals())  # the CompressionConfig fields among the arguments
        self._init_compression(compression, options, save_compression_memory, False, kwargs)
        self._pending_optimizers: list[Optimizer] = []
        self._end_line_due = False
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        log.debug(f"{type(self).__name__}: {self._compression}")

    @override
    def setup_module(self, module: Module) -> DistributedDataParallel:
        ddp = super().setup_module(module)
        self._register_compression_hook(ddp)
        self._attach_optimizers(self._pending_optimizers)
        self._say_start(ddp)
        if not self._end_line_due:
            # Fabric has no end of training it tells a strategy about: the summary comes at process exit
            # (or at teardown, if that comes first). multiprocessing runs these finalizers in its children too.
            self._end_line_due = True
            multiprocessing.util.Finalize(None, self._say_end, exitpriority=10)
        return ddp

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        optimizer = super().setup_optimizer(optimizer)
        # fabric.setup(model, optimizer) sets up the module first; setup_optimizers alone may come first.
        if self._compression_state is None:
            self._pending_optimizers = [optimizer]
        else:
            self._attach_optimizers([optimizer])
        return optimizer

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        scaler = getattr(self.precision, "scaler", None)
        before = current_scale(scaler)
        output = super().optimizer_step(optimizer, **kwargs)
        self._follow_loss_scale(scaler, before)  # memory is in loss-scaled units
        return output

    @override
    def save_checkpoint(
        self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None, filter: Optional[Any] = None
    ) -> None:
        # Called on every rank; whether to gather depends only on `state`, the same on all ranks.
        if self._compression_state is not None and any(isinstance(v, Optimizer) for v in state.values()):
            log.debug(f"{type(self).__name__}: gathering compression state of all ranks")
            blob = self._gather_compression()
            state = {**state, CHECKPOINT_KEY: blob} if blob is not None else state
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    @override
    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True, **kwargs: Any) -> dict[str, Any]:
        # The user's own `state` dict goes through: Fabric restores its plain entries (a step counter, metadata)
        # into it in place, as plain DDP does. The compression state comes back in the remainder.
        remainder = super().load_checkpoint(path, state, strict=strict, **kwargs)
        blob = remainder.get(CHECKPOINT_KEY) if isinstance(remainder, dict) else None
        if blob is None and isinstance(state, dict) and isinstance(state.get(CHECKPOINT_KEY), dict):
            blob = state[CHECKPOINT_KEY]  # the caller asked for it by name: Fabric put it into `state`
        if blob is not None:
            if state and isinstance(remainder, dict):  # restored here: not an unknown leftover
                remainder = {k: v for k, v in remainder.items() if k != CHECKPOINT_KEY}
            self._stash_loaded_compression(blob)
        return remainder

    @override
    def teardown(self) -> None:
        self._end_compression()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_names(cls, strategy_registry, ("lightning_compress.fabric.CompressedDDPStrategy",))


CompressedDDPStrategy.register_strategies(STRATEGY_REGISTRY)
