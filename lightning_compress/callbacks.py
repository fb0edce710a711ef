"""Compression monitor: logs what compressed gradient exchange buys, every optimizer step.

In a Trainer the metrics go through ``LightningModule.log``, so every logger (CSV, TensorBoard, ...)
and the progress bar see them; in Fabric, ``Fabric(callbacks=[CompressionMonitor()], loggers=...)``
sends the same metrics through ``fabric.log_dict``. All values are this rank's (rank 0 logs):

- ``compression/ratio``: bytes on the wire: what a dense ring allreduce would send over what this
  rank sent in the last step, every index, scale and densely sent tensor and the transport's fan-out
  included (progress bar). Not GraVAC's ``gravac/cf``, which counts elements kept: top-k at CF 20
  sends a 4-byte index with each 4-byte value, so its ratio is about 10 on 2 ranks;
- ``compression/bytes_sent``: bytes this rank sent in the last optimizer step;
- ``compression/bytes_sent_total``: bytes this rank sent since the hook was registered;
- ``compression/dense_bytes``: bytes a dense allreduce of the same buckets would be handed;
- ``compression/gain``: ``1 - ||C(v) - v||^2 / ||v||^2`` of the last step (1 = lossless);
- ``compression/ratio_mean``: the ratio averaged over the epoch (Trainer only; a torchmetrics ``MeanMetric``).

With ``layer_every_n_steps=N``, every N-th step also logs ``compression/layer/<tensor>/ratio``,
``.../bytes_sent`` and ``.../gain`` per tensor (see :func:`lightning_compress.report.layer_rows`), and
``layer_table=True`` prints the per-tensor table at the end of ``fit`` (rank 0; under Fabric, which has no
end of training, when the process ends: gains from the gradients still there, else from the last step that
logged per-tensor metrics).

:class:`~lightning_compress.strategy.CompressedDDPStrategy` adds a monitor by itself; pass one
explicitly to change its options.
"""

from __future__ import annotations

import multiprocessing.util
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_compress import report

__all__ = ["CompressionMonitor", "GraVAC"]


def _ddp_module(strategy: Any) -> Any:
    """The module DDP wraps (its parameter names are the compression state's)."""
    return strategy.compressed_module


class _CompressionMonitorMixin:
    """Framework-neutral body of the monitor (shared by the ``lightning`` and ``pytorch_lightning`` twins)."""

    def __init__(
        self,
        prefix: str = "compression/",
        prog_bar: bool = True,
        layer_every_n_steps: Optional[int] = None,
        layer_table: bool = False,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be str; got {type(prefix).__name__} {prefix!r}")
        if layer_every_n_steps is not None and (
            isinstance(layer_every_n_steps, bool) or not isinstance(layer_every_n_steps, int) or layer_every_n_steps < 1
        ):
            raise ValueError(f"`layer_every_n_steps` must be an int >= 1 or None; got {layer_every_n_steps!r}")
        super().__init__()
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.layer_every_n_steps = layer_every_n_steps
        self.layer_table = layer_table
        self._ratio_mean = MeanMetric(sync_on_compute=False)
        self._logged_step = -1  # stats.steps at the last log: one log per optimizer step
        self._fabric: Any = None
        self._last_rows: list[report.LayerRow] | None = None  # the per-tensor view of the last step that took it
        self._table_at_exit = False

    def _new_step(self, state: Any) -> bool:
        if state is None or state.stats.steps == 0 or state.stats.steps == self._logged_step:
            return False
        self._logged_step = state.stats.steps
        return True

    def _layer_metrics(self, state: Any, strategy: Any) -> dict[str, float]:
        every = self.layer_every_n_steps
        if every is None or state.stats.steps % every:
            return {}
        self._last_rows = report.layer_rows(state, _ddp_module(strategy).named_parameters())
        return report.layer_metrics(self._last_rows, self.prefix)

    def _print_table(self, state: Any, strategy: Any) -> None:
        rows = report.layer_rows(state, _ddp_module(strategy).named_parameters())
        if self._last_rows is not None and all(r.gain is None for r in rows):  # gradients already cleared
            rows = self._last_rows
        report.report_logger.info(report.layer_table(rows))

    # ----- Trainer -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._ratio_mean.reset()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        state = getattr(trainer.strategy, "compression_state", None)
        if not self._new_step(state):
            return
        self._ratio_mean.update(state.stats.ratio)
        # Values are this rank's; no sync (no collectives from a logging callback, see DESIGN.md).
        kw = dict(on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        for name, value in report.step_metrics(state, self.prefix).items():
            pl_module.log(name, value, prog_bar=self.prog_bar and name == self.prefix + "ratio", **kw)
        pl_module.log(self.prefix + "ratio_mean", float(self._ratio_mean.compute()), **kw)
        layers = self._layer_metrics(state, trainer.strategy)
        if layers and trainer.global_rank == 0:
            # Straight to the loggers, as LearningRateMonitor does: self.log would repeat the values every step.
            step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
            for logger in trainer.loggers:
                logger.log_metrics(layers, step=step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        state = getattr(trainer.strategy, "compression_state", None)
        if self.layer_table and state is not None and state.stats.steps and trainer.global_rank == 0:
            self._print_table(state, trainer.strategy)

    # ----- Fabric (its callbacks are plain objects with these methods) ---------------------------
    def on_after_setup(self, fabric: Any, module: Any) -> None:
        self._fabric = fabric

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        state = getattr(strategy, "compression_state", None)
        fabric = self._fabric
        if fabric is None or not fabric.loggers or not self._new_step(state):
            return
        if self.layer_table and not self._table_at_exit and fabric.global_rank == 0:
            self._table_at_exit = True
            multiprocessing.util.Finalize(None, self._print_table, args=(state, strategy), exitpriority=10)
        metrics = {**report.step_metrics(state, self.prefix), **self._layer_metrics(state, strategy)}
        adaptive = getattr(state, "adaptive", None)
        if adaptive is not None:
            metrics.update(report.gravac_metrics(adaptive))
        fabric.log_dict(metrics, step=state.step)


class CompressionMonitor(_CompressionMonitorMixin, pl.Callback):
    """Log the compression ratio, bytes sent per step and compression gain through the loggers.

    A Trainer callback (the ``compressed_ddp`` strategy adds one by itself), and a Fabric callback:
    ``Fabric(strategy="compressed_ddp", loggers=CSVLogger(...), callbacks=[CompressionMonitor()])`` logs
    the same metrics through ``fabric.log_dict`` after every optimizer step (with GraVAC attached, its
    ``gravac/*`` metrics too). See the module docstring for the metric names.

    Args:
        prefix: prepended to every metric name.
        prog_bar: show the ratio in the progress bar (Trainer).
        layer_every_n_steps: every N-th step, log each tensor's ratio, bytes sent and gain
            (``<prefix>layer/<tensor>/...``); ``None`` (default) for none.
        layer_table: print the per-tensor table at the end of ``fit`` (rank 0; Fabric: when the process ends).

    Raises:
        TypeError: ``prefix`` is not a string.
        ValueError: ``layer_every_n_steps`` is not a positive int or ``None``.

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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)


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

    def __init__(
        self,
        *,
        theta_min: Optional[float] = None,
        theta_max: Optional[float] = None,
        epsilon: float = 0.7,
        omega: float = 0.01,
        window: Optional[int] = None,
        scaling: Literal["exponential", "geometric"] = "exponential",
        ewma: Optional[float] = None,
        prefix: str = "gravac/",
        prog_bar: bool = True,
    ) -> None:
        from lightning_compress.gravac import GraVACController

        super().__init__()
        params = dict(theta_min=theta_min, theta_max=theta_max, epsilon=epsilon, omega=omega, window=window,
                      scaling=scaling, ewma=ewma)  # fmt: skip
        GraVACController(**params)  # validate the parameters now, not at fit time
        self.theta_min, self.theta_max, self.epsilon, self.omega = theta_min, theta_max, epsilon, omega
        self.window, self.scaling, self.ewma = window, scaling, ewma
        self.prefix = prefix
        self.prog_bar = prog_bar
        # What goes to the controller: the parameters given (None: the controller's default for this run).
        self.controller_kwargs = {k: v for k, v in params.items() if v is not None}
        self.run = None  # the AdaptiveRun once attached
        self._loaded: dict[str, Any] | None = None

    def _strategy_check(self, trainer: Any) -> None:
        from lightning_compress.adaptive import gravac_config_problem
        from lightning_compress.strategy_base import _CompressionCore

        strategy = trainer.strategy
        if not isinstance(strategy, _CompressionCore):
            raise _misconfiguration(
                f"GraVAC adapts the compression of the `compressed_ddp` strategy; this Trainer uses "
                f"{type(strategy).__name__}. Use {GRAVAC_STRATEGY_HINT}."
            )
        problem = gravac_config_problem(strategy.compression_config)
        if problem is not None:
            raise _misconfiguration(f"{problem}. Use {GRAVAC_STRATEGY_HINT}.")

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
        # Identical on every rank (combined over ranks before the controller saw them).
        kw = dict(on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        for name, value in report.gravac_metrics(self.run, self.prefix).items():
            pl_module.log(name, value, prog_bar=self.prog_bar and name == self.prefix + "cf", **kw)

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


#: A strategy GraVAC runs with, as the error messages suggest it.
GRAVAC_STRATEGY_HINT = 'Trainer(strategy=CompressedDDPStrategy(compressor="topk", feedback="ef"), callbacks=[GraVAC()])'


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

    ``gravac/cf`` counts elements: dense elements over elements kept (density ``1 / CF``).
    ``compression/ratio`` counts bytes on the wire, and top-k sends an int32 index with every
    value (and the tensors below ``min_numel`` densely), so at CF 20 the ratio is about 10.

    Args:
        theta_min: the lowest CF (>= 1); ``None``: 10, or QSGD's 8-bit rung.
        theta_max: the highest CF; ``None``: 1000 (exponential) or 2000 (geometric), or QSGD's 1-bit rung.
        epsilon: smallest smoothed gain a CF needs to be sent, in (0, 1] (0.9: the paper's conservative one).
        omega: agreement tolerance of the gains (absolute) and throughputs (relative) that promote and settle.
        window: steps between schedule changes; ``None``: 500 (exponential) or 2000 (geometric).
        scaling: how the candidate CF grows each window: ``'exponential'`` (squared) or ``'geometric'`` (doubled).
        ewma: weight of the newest gain in the smoothed gains, in (0, 1]; ``None``: world size / 100.
        prefix: prepended to every metric name.
        prog_bar: show the CF in the progress bar.

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
