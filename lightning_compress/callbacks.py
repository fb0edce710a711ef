"""Compression monitor: logs what compressed gradient exchange buys, every training step.

The metrics go through ``LightningModule.log``, so every logger (CSV, TensorBoard, ...) and the
progress bar see them:

- ``compression/ratio``: dense ring-allreduce bytes over the bytes this rank sent (progress bar);
- ``compression/bytes_sent``: bytes this rank sent in the last optimizer step;
- ``compression/bytes_sent_total``: bytes this rank sent since the hook was registered;
- ``compression/dense_bytes``: bytes a dense allreduce of the same buckets would take;
- ``compression/gain``: ``1 - ||C(v) - v||^2 / ||v||^2`` of the last step (1 = lossless);
- ``compression/ratio_mean``: the ratio averaged over the epoch (a torchmetrics ``MeanMetric``).

:class:`~lightning_compress.strategy.CompressedDDPStrategy` adds a monitor by itself; pass one
explicitly to change its options.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torchmetrics import MeanMetric
from typing_extensions import override

__all__ = ["CompressionMonitor", "GraVAC"]


class _CompressionMonitorMixin:
    """Framework-neutral body of the monitor (shared by the ``lightning`` and ``pytorch_lightning`` twins)."""

    def __init__(self, prefix: str = "compression/", prog_bar: bool = True) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be str; got {type(prefix).__name__} {prefix!r}")
        super().__init__()
        self.prefix = prefix
        self.prog_bar = prog_bar
        self._ratio_mean = MeanMetric(sync_on_compute=False)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._ratio_mean.reset()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        state = getattr(trainer.strategy, "compression_state", None)
        if state is None or state.stats.steps == 0:
            return
        s, p = state.stats, self.prefix
        self._ratio_mean.update(s.ratio)
        # Values are this rank's; no sync (no collectives from a logging callback, see DESIGN.md).
        kw = dict(on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        pl_module.log(p + "ratio", float(s.ratio), prog_bar=self.prog_bar, **kw)
        pl_module.log(p + "bytes_sent", float(s.sent_bytes_last_step), **kw)
        pl_module.log(p + "bytes_sent_total", float(s.sent_bytes_total), **kw)
        pl_module.log(p + "dense_bytes", float(s.dense_bytes_last_step), **kw)
        pl_module.log(p + "gain", float(s.gain), **kw)
        pl_module.log(p + "ratio_mean", float(self._ratio_mean.compute()), **kw)


class CompressionMonitor(_CompressionMonitorMixin, pl.Callback):
    """Log compression ratio, bytes sent per step and compression gain through the trainer's logger.

    Args:
        prefix: prepended to every metric name.
        prog_bar: show the ratio in the progress bar.

    Raises:
        TypeError: ``prefix`` is not a string.

    Example::

        >>> CompressionMonitor(prefix="comm/").prefix
        'comm/'
    """

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _make_pytorch_lightning_monitor() -> type | None:
    try:
        import pytorch_lightning
    except ImportError:
        return None

    class CompressionMonitorPL(_CompressionMonitorMixin, pytorch_lightning.Callback):
        """:class:`CompressionMonitor` for the standalone ``pytorch_lightning`` package."""

    return CompressionMonitorPL


def _batch_size(batch: Any) -> int | None:
    """Samples in a batch: the leading size of its first tensor (tuples, lists, dicts)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size is not None:
            return size
    return None


class _GraVACMixin:
    """Framework-neutral body of the GraVAC callback."""

    def __init__(self, prefix: str = "gravac/", prog_bar: bool = True, **controller_kwargs: Any) -> None:
        from lightning_compress.gravac import GraVACController

        super().__init__()
        GraVACController(**controller_kwargs)  # validate the parameters now, not at fit time
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.controller_kwargs = dict(controller_kwargs)
        self.run = None  # the AdaptiveRun once attached
        self._loaded: dict[str, Any] | None = None

    def _strategy_check(self, trainer: Any) -> None:
        from lightning_compress.adaptive import ADAPTIVE_COMPRESSORS
        from lightning_compress.strategy import _CompressionCore

        strategy = trainer.strategy
        if not isinstance(strategy, _CompressionCore):
            raise _misconfiguration(
                f"GraVAC adapts the compression of the `compressed_ddp` strategy; this Trainer uses "
                f"{type(strategy).__name__}. Use Trainer(strategy='compressed_ddp', callbacks=[GraVAC()])."
            )
        cfg = strategy.compression_config
        if cfg.compressor not in ADAPTIVE_COMPRESSORS or cfg.feedback != "ef":
            raise _misconfiguration(
                f"GraVAC needs compressor in {ADAPTIVE_COMPRESSORS} with feedback='ef'; the strategy has "
                f"compressor={cfg.compressor!r}, feedback={cfg.feedback!r}"
            )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._strategy_check(trainer)

    def _attach(self, trainer: Any) -> None:
        from lightning_compress.adaptive import attach_gravac

        state = trainer.strategy.compression_state
        if state is None or self.run is not None:
            return
        self.run = state.adaptive if state.adaptive is not None else attach_gravac(state, **self.controller_kwargs)
        if self._loaded is not None:
            self.run.controller.load_state_dict(self._loaded)
            self._loaded = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._attach(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._attach(trainer)
        size = _batch_size(batch)
        if self.run is not None and size is not None:
            self.run.samples_per_step = float(size * trainer.world_size * trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.run is None or not self.run.last:
            return
        last, ctrl, p = self.run.last, self.run.controller, self.prefix
        # Identical on every rank (combined over ranks before the controller saw them).
        kw = dict(on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        pl_module.log(p + "cf", float(last["cf"]), prog_bar=self.prog_bar, **kw)
        pl_module.log(p + "gain", float(last["gain"]), **kw)
        pl_module.log(p + "gain_min", float(last["gain_min"]), **kw)
        pl_module.log(p + "gain_candidate", float(last["gain_candidate"]), **kw)
        pl_module.log(p + "theta_min", float(ctrl.theta_min), **kw)
        pl_module.log(p + "candidate_cf", float(ctrl.candidate_cf), **kw)
        pl_module.log(p + "throughput", float(last["throughput"]), **kw)

    def state_dict(self) -> dict[str, Any]:
        if self.run is not None:
            return {"controller": self.run.controller.state_dict()}
        return {"controller": self._loaded} if self._loaded is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("controller")
        if saved is None:
            return
        if self.run is not None:
            self.run.controller.load_state_dict(saved)
        else:
            self._loaded = dict(saved)


def _misconfiguration(message: str) -> Exception:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return MisconfigurationException(message)


class GraVAC(_GraVACMixin, pl.Callback):
    """Adapt the compression factor online with GraVAC (Tyagi and Swany, IEEE CLOUD 2023).

    Use with the ``compressed_ddp`` strategy and ``compressor`` ``topk``, ``dgc`` (density is
    set by the controller) or ``qsgd`` (bit width walks 8, 4, 2, 1), ``feedback='ef'``::

        Trainer(strategy=CompressedDDPStrategy(compressor="topk", feedback="ef"), callbacks=[GraVAC()])

    Every step logs ``gravac/cf`` (the factor sent; 1 = dense, in the progress bar),
    ``gravac/gain`` (of what was sent), ``gravac/gain_min``, ``gravac/gain_candidate``,
    ``gravac/theta_min``, ``gravac/candidate_cf`` and ``gravac/throughput`` (samples/s of the
    slowest rank). The controller's state goes into checkpoints, so a resumed run continues
    the same schedule.

    Args:
        prefix: prepended to every metric name.
        prog_bar: show the CF in the progress bar.
        **controller_kwargs: :class:`~lightning_compress.gravac.GraVACController` parameters
            (``theta_min``, ``theta_max``, ``epsilon``, ``omega``, ``window``, ``scaling``, ``ewma``).

    Raises:
        MisconfigurationException: at ``fit``, when the strategy is not ``compressed_ddp`` or its
            compressor/feedback cannot be adapted.
        ValueError: bad controller parameters (at construction).
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
