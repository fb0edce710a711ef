"""Compression monitor: logs what compressed gradient exchange buys, every training step.

The metrics go through ``LightningModule.log``, so every logger (CSV, TensorBoard, ...) and the
progress bar see them:

- ``compression/ratio``: dense ring-allreduce bytes over the bytes this rank sent (progress bar);
- ``compression/bytes_sent``: bytes this rank sent in the last optimizer step;
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

__all__ = ["CompressionMonitor"]


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
