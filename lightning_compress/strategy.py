"""``CompressedDDPStrategy``: Lightning's DDP with compressed, error-compensated gradient exchange.

Importing this module (``import lightning_compress`` does) registers the strategy names
``compressed_ddp``, ``compressed_ddp_spawn``, ``compressed_ddp_fork`` and ``compressed_ddp_notebook``
in ``lightning.pytorch``'s strategy registry and, when installed, in ``pytorch_lightning``'s.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import fields
from datetime import timedelta
from typing import Any, Literal, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_compress import report
from lightning_compress.callbacks import CompressionMonitor, _make_pytorch_lightning_monitor
from lightning_compress.compressors import COMPRESSORS
from lightning_compress.config import FEEDBACKS, MOMENTUM_MODES, TRANSPORTS, CompressionConfig
from lightning_compress.hook import register_compression
from lightning_compress.momentum import attach_optimizer
from lightning_compress.state import CompressionState

__all__ = ["CHECKPOINT_KEY", "CompressedDDPStrategy", "CompressedDDPStrategyPL", "build_config"]

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lightning_compress"
_FIELDS = tuple(f.name for f in fields(CompressionConfig))
_DEFAULTS = {f.name: f.default for f in fields(CompressionConfig)}
# The choices, as types that signatures show (help(), IDEs, LightningCLI).
CompressorName = Literal[tuple(COMPRESSORS)]  # type: ignore[valid-type]
FeedbackName = Literal[FEEDBACKS]  # type: ignore[valid-type]
TransportName = Literal[TRANSPORTS]  # type: ignore[valid-type]
MomentumMode = Literal[MOMENTUM_MODES]  # type: ignore[valid-type]
_COMM_HOOK_ARGS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper")
# DistributedDataParallel's defaults of the options the Trainer strategy names in its signature.
_DDP_DEFAULTS = dict(find_unused_parameters=False, static_graph=False, gradient_as_bucket_view=False,
                     bucket_cap_mb=None, broadcast_buffers=True)  # fmt: skip
_OWN_ARGS = ("compression", "save_compression_memory", "log_compression_stats")
_NAMES = (
    ("compressed_ddp", "popen"),
    ("compressed_ddp_spawn", "spawn"),
    ("compressed_ddp_fork", "fork"),
    ("compressed_ddp_notebook", "fork"),
)


def build_config(
    compression: CompressionConfig | Mapping[str, Any] | str | None = None, **options: Any
) -> CompressionConfig:
    """A validated :class:`CompressionConfig` from a base (config, dict or ``"k=v,..."``) and field overrides.

    ``None`` values in ``options`` mean "not given"; given fields override the base.

    Example::

        >>> build_config("compressor=topk", density=0.1, feedback="ef21").density
        0.1
    """
    unknown = sorted(set(options) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown compression option(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if compression is None:
        base: dict[str, Any] = {}
    elif isinstance(compression, CompressionConfig):
        base = compression.to_dict()
    elif isinstance(compression, str):
        base = CompressionConfig.from_string(compression).to_dict()
    elif isinstance(compression, Mapping):
        base = CompressionConfig.from_dict(compression).to_dict()
    else:
        raise TypeError(
            f"`compression` must be a CompressionConfig, a dict or a 'key=value,...' string; "
            f"got {type(compression).__name__}"
        )
    base.update({k: v for k, v in options.items() if v is not None})
    return CompressionConfig.from_dict(base)


def _ddp_keywords() -> tuple[str, ...]:
    """What ``DistributedDataParallel`` takes besides the module (DDP strategies hand their extra keywords to it)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return tuple(n for n, p in params.items() if n not in ("self", "module") and p.kind == p.POSITIONAL_OR_KEYWORD)


def _check_ddp_keywords(strategy: str, ddp_kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword neither the strategy nor DDP knows, here, instead of a TypeError inside every worker."""
    known_ddp = (*_ddp_keywords(), *_COMM_HOOK_ARGS)
    unknown = [key for key in ddp_kwargs if key not in known_ddp]
    if not unknown:
        return
    ours = (*_FIELDS, *_OWN_ARGS)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, ours, n=1, cutoff=0.6) or difflib.get_close_matches(key, known_ddp, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise TypeError(
        f"{strategy} got unknown keyword(s) {', '.join(hints)}. Its compression options are {', '.join(ours)}; "
        "other keywords go to torch's DistributedDataParallel (e.g. bucket_cap_mb, find_unused_parameters, "
        "static_graph). Fix the spelling or drop the keyword."
    )


def _given(compression: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options that override ``compression``: all of them without a base, else those off their default."""
    if compression is None:
        return dict(options)
    return {k: v for k, v in options.items() if v != _DEFAULTS[k] or type(v) is not type(_DEFAULTS[k])}


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
        _check_ddp_keywords(type(self).__name__, ddp_kwargs)
        given = sorted(k for k in _COMM_HOOK_ARGS if ddp_kwargs.get(k) is not None)
        if given:
            raise ValueError(
                f"{type(self).__name__} registers its own DDP comm hook (compressed exchange); it cannot also take "
                f"{given}. Use `DDPStrategy({given[0]}=...)` for a custom hook, or drop it."
            )
        if not isinstance(save_compression_memory, bool):
            raise TypeError(f"`save_compression_memory` must be bool; got {save_compression_memory!r}")
        self._compression = build_config(compression, **_given(compression, options))
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
            if state.config.momentum in ("lookahead", "heavy_ball"):
                raise ValueError(
                    f"`momentum={state.config.momentum!r}` moves one optimizer's momentum into the exchange; this run "
                    f"has {len(unwrapped)} optimizers. Use `momentum='optimizer'` (or 'auto', which then keeps it)."
                )
            log.info("lightning_compress: %d optimizers; their momentum stays in them", len(unwrapped))
            return
        attach_optimizer(state, unwrapped[0])

    def _detach_optimizers(self) -> None:
        state = self._compression_state
        if state is not None and state.momentum is not None:
            state.momentum.detach()

    def _apply_loaded_compression(self) -> None:
        blob, state = self._loaded_compression, self._compression_state
        if blob is None or state is None:
            return
        self._loaded_compression = None
        ranks = blob["ranks"]
        saved_world = int(blob["world_size"])
        if saved_world != state.world_size:
            rank_zero_warn(
                f"lightning_compress: the checkpoint holds compression state for {saved_world} ranks but this run has "
                f"{state.world_size}; step and settings are restored, residuals and shifts start from zero "
                "(training continues, but not bit-for-bit)."
            )
        log.debug(f"{type(self).__name__}: restoring compression state of rank {state.rank}")
        state.load_state_dict(ranks[min(state.rank, len(ranks) - 1)])

    def _gather_compression(self) -> dict[str, Any] | None:
        state = self._compression_state
        if state is None:
            return None
        sd = state.state_dict()
        if not self._save_compression_memory:
            sd["memory"], sd["server_memory"] = {}, {}
        # CPU copies: a pickled CUDA tensor would unpickle on the sender's device index on rank 0.
        sd["memory"] = {n: {k: t.cpu() for k, t in m.items()} for n, m in sd["memory"].items()}
        sd["server_memory"] = {n: t.cpu() for n, t in sd["server_memory"].items()}
        # Velocities are the optimizer's momentum: kept even without memory, as an optimizer state is.
        sd["velocity"] = {n: t.cpu() for n, t in sd["velocity"].items()}
        group = state.process_group
        if state.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] | None = [None] * state.world_size if state.rank == 0 else None
            dst = dist.get_global_rank(group, 0) if group is not None else 0
            dist.gather_object(sd, gathered, dst=dst, group=group)
        else:
            gathered = [sd]
        if state.rank != 0:
            return None
        return {
            "format": 1,
            "world_size": state.world_size,
            "config": state.config.to_dict(),
            "memory_saved": self._save_compression_memory,
            "ranks": gathered,
        }


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
        min_numel: int = 1024,
        block_size: int = 1024,
        seed: int = 0,
        diana_alpha: Optional[float] = None,
        dgc_sample_fraction: float = 0.01,
        momentum: MomentumMode = "auto",
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
        options = dict(
            compressor=compressor, density=density, bits=bits, feedback=feedback, transport=transport,
            warmup_steps=warmup_steps, min_numel=min_numel, block_size=block_size, seed=seed,
            diana_alpha=diana_alpha, dgc_sample_fraction=dgc_sample_fraction, momentum=momentum,
        )  # fmt: skip
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
        before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if before is not None and self._compression_state is not None:
            after = scaler.get_scale()
            if after != before:
                # Memory holds loss-scaled gradients: keep it in the units the next backward uses,
                # or every scale change (growth, or a skipped overflow step) would poison it.
                _rescale_memory(self._compression_state, after / before)
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
        self._loaded_compression = checkpoint.get(CHECKPOINT_KEY)
        if self._loaded_compression is not None:
            log.debug(f"{type(self).__name__}: compression state found in {checkpoint_path}")
        if self._hook_active:  # strategies that restore after setup
            self._apply_loaded_compression()
        return checkpoint

    @override
    def teardown(self) -> None:
        log.debug(f"{type(self).__name__}: tearing down (compression state kept for inspection)")
        self._say_end()
        self._loaded_compression = None
        self._hook_active = False
        self._detach_optimizers()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        _register_names(cls, strategy_registry)


def _register_names(cls: type, strategy_registry: Any, class_paths: tuple[str, ...] | None = None) -> None:
    """The short names, and the class paths: LightningCLI hands ``--trainer.strategy=lightning_compress.
    CompressedDDPStrategy`` without init arguments over as a plain string, which must resolve too."""
    for name, start_method in _NAMES:
        strategy_registry.register(
            name,
            cls,
            description=f"lightning_compress: DDP with compressed gradients, start_method '{start_method}'",
            override=True,  # re-import/reload must not fail
            start_method=start_method,
        )
    for path in _CLASS_PATHS if class_paths is None else class_paths:
        for key in dict.fromkeys((path, path.lower())):  # Lightning lowercases the string before the look-up
            strategy_registry.register(
                key, cls, description="lightning_compress: DDP with compressed gradients (class path)", override=True
            )


_CLASS_PATHS = ("lightning_compress.CompressedDDPStrategy", "lightning_compress.strategy.CompressedDDPStrategy")


def _gravac_theta_min(trainer: Any, config: CompressionConfig) -> float | None:
    """The factor a GraVAC callback among the trainer's starts at; ``None`` without one."""
    from lightning_compress.callbacks import _GraVACMixin

    for cb in trainer.callbacks:
        if isinstance(cb, _GraVACMixin):
            if cb.theta_min is not None:
                return float(cb.theta_min)
            return 32.0 / 9.0 if config.compressor == "qsgd" else 10.0
    return None


def _rescale_memory(state: CompressionState, factor: float) -> None:
    log.debug(f"lightning_compress: loss scale changed, rescaling compression memory by {factor}")
    state.rescale_memory(factor)


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
        compressor, density, bits, feedback, transport, warmup_steps, min_numel, block_size, seed, diana_alpha,
            dgc_sample_fraction, momentum: the :class:`~lightning_compress.CompressionConfig` fields.

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

# The Fabric names register with this module, so `import lightning_compress` gives both.
from lightning_compress import fabric as _fabric  # noqa: E402,F401  (import cycle: fabric needs the core above)
