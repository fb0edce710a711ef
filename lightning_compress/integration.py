"""What every integration (Lightning Trainer and Fabric strategies, Accelerate) does the same way.

Framework-free: this module imports PyTorch and the core only, never Lightning or Accelerate, so
each integration calls it with its own objects:

- options to a config: :func:`~lightning_compress.config.build_config` (a base config plus keyword
  overrides, the one path every integration and ``register_compression`` take) and the checks of
  the keywords a DDP strategy hands on (:func:`check_ddp_keywords`, :func:`refuse_comm_hooks`);
- the strategy names and class paths a registry gets (:func:`register_names`);
- every rank's state in a checkpoint: :func:`rank_state_dict` (this rank's, on the CPU),
  :func:`gather_ranks`, :func:`checkpoint_blob`, and :func:`load_own_rank` on the way back;
- following the loss scale: :func:`current_scale` and :func:`follow_loss_scale`.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import fields
from typing import Any, Callable, Literal, Mapping

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import COMPRESSORS
from lightning_compress.config import FEEDBACKS, MOMENTUM_MODES, TRANSPORTS, CompressionConfig, build_config
from lightning_compress.state import CompressionState

__all__ = [
    "CHECKPOINT_KEY",
    "STRATEGY_NAMES",
    "build_config",
    "check_ddp_keywords",
    "checkpoint_blob",
    "config_options",
    "current_scale",
    "follow_loss_scale",
    "gather_ranks",
    "given_options",
    "load_own_rank",
    "rank_state_dict",
    "refuse_comm_hooks",
    "register_names",
]

# The choices, as types that signatures show (help(), IDEs, LightningCLI).
CompressorName = Literal[tuple(COMPRESSORS)]  # type: ignore[valid-type]
FeedbackName = Literal[FEEDBACKS]  # type: ignore[valid-type]
TransportName = Literal[TRANSPORTS]  # type: ignore[valid-type]
MomentumMode = Literal[MOMENTUM_MODES]  # type: ignore[valid-type]
#: Where a Trainer or Fabric checkpoint holds every rank's compression state.
CHECKPOINT_KEY = "lightning_compress"
CONFIG_FIELDS = tuple(f.name for f in fields(CompressionConfig))
_DEFAULTS = {f.name: f.default for f in fields(CompressionConfig)}
COMM_HOOK_ARGS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper")
#: The strategy's own keywords besides the config fields.
OWN_ARGS = ("compression", "save_compression_memory", "log_compression_stats")
#: The registered names and the start method each one stands for.
STRATEGY_NAMES = (
    ("compressed_ddp", "popen"),
    ("compressed_ddp_spawn", "spawn"),
    ("compressed_ddp_fork", "fork"),
    ("compressed_ddp_notebook", "fork"),
)


# ----- options to a config ------------------------------------------------------------------------
def config_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`CompressionConfig` fields among a strategy constructor's ``arguments`` (its ``locals()``),
    in the config's order."""
    return {name: arguments[name] for name in CONFIG_FIELDS if name in arguments}


def given_options(compression: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options that override ``compression``: all of them without a base, else those off their default."""
    if compression is None:
        return dict(options)
    return {k: v for k, v in options.items() if v != _DEFAULTS[k] or type(v) is not type(_DEFAULTS[k])}


def _ddp_keywords() -> tuple[str, ...]:
    """What ``DistributedDataParallel`` takes besides the module (DDP strategies hand their extra keywords to it)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return tuple(n for n, p in params.items() if n not in ("self", "module") and p.kind == p.POSITIONAL_OR_KEYWORD)


def check_ddp_keywords(strategy: str, ddp_kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword neither the strategy nor DDP knows, here, instead of a TypeError inside every worker."""
    known_ddp = (*_ddp_keywords(), *COMM_HOOK_ARGS)
    unknown = [key for key in ddp_kwargs if key not in known_ddp]
    if not unknown:
        return
    ours = (*CONFIG_FIELDS, *OWN_ARGS)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, ours, n=1, cutoff=0.6) or difflib.get_close_matches(key, known_ddp, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise TypeError(
        f"{strategy} got unknown keyword(s) {', '.join(hints)}. Its compression options are {', '.join(ours)}; "
        "other keywords go to torch's DistributedDataParallel (e.g. bucket_cap_mb, find_unused_parameters, "
        "static_graph). Fix the spelling or drop the keyword."
    )


def refuse_comm_hooks(strategy: str, ddp_kwargs: Mapping[str, Any]) -> None:
    """A compressing strategy registers its own DDP comm hook: it cannot take another one."""
    given = sorted(k for k in COMM_HOOK_ARGS if ddp_kwargs.get(k) is not None)
    if given:
        raise ValueError(
            f"{strategy} registers its own DDP comm hook (compressed exchange); it cannot also take "
            f"{given}. Use `DDPStrategy({given[0]}=...)` for a custom hook, or drop it."
        )


# ----- registration -------------------------------------------------------------------------------
def register_names(cls: type, strategy_registry: Any, class_paths: tuple[str, ...]) -> None:
    """The short names, and the class paths: LightningCLI hands ``--trainer.strategy=lightning_compress.
    CompressedDDPStrategy`` without init arguments over as a plain string, which must resolve too."""
    for name, start_method in STRATEGY_NAMES:
        strategy_registry.register(
            name,
            cls,
            description=f"lightning_compress: DDP with compressed gradients, start_method '{start_method}'",
            override=True,  # re-import/reload must not fail
            start_method=start_method,
        )
    for path in class_paths:
        for key in dict.fromkeys((path, path.lower())):  # Lightning lowercases the string before the look-up
            strategy_registry.register(
                key, cls, description="lightning_compress: DDP with compressed gradients (class path)", override=True
            )


# ----- every rank's state in a checkpoint ---------------------------------------------------------
def rank_state_dict(state: CompressionState, keep_memory: bool = True) -> dict[str, Any]:
    """This rank's :meth:`CompressionState.state_dict` with its tensors on the CPU (a pickled CUDA tensor
    would unpickle on the sender's device index); without ``keep_memory`` residuals and shifts are left out."""
    sd = state.state_dict()
    if not keep_memory:
        sd["memory"], sd["server_memory"] = {}, {}
    sd["memory"] = {n: {k: t.cpu() for k, t in m.items()} for n, m in sd["memory"].items()}
    sd["server_memory"] = {n: t.cpu() for n, t in sd["server_memory"].items()}
    # Velocities are the optimizer's momentum: kept even without memory, as an optimizer state is.
    sd["velocity"] = {n: t.cpu() for n, t in sd["velocity"].items()}
    # PowerSGD's factors (m x r each, the same on every rank) are kept too: small, and needed for an exact resume.
    sd["factors"] = {n: t.cpu() for n, t in sd.get("factors", {}).items()}
    return sd


def gather_ranks(state: CompressionState, sd: dict[str, Any], *, everywhere: bool) -> list[Any] | None:
    """Every rank's ``sd``, in rank order: on every rank (``everywhere``) or on rank 0 only (``None`` elsewhere).

    A collective over ``state.process_group`` when several processes run: all ranks call it together.
    """
    group = state.process_group
    if not (state.world_size > 1 and dist.is_available() and dist.is_initialized()):
        return [sd]
    if everywhere:
        gathered: list[Any] | None = [None] * state.world_size
        dist.all_gather_object(gathered, sd, group=group)
        return gathered
    gathered = [None] * state.world_size if state.rank == 0 else None
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    dist.gather_object(sd, gathered, dst=dst, group=group)
    return gathered


def checkpoint_blob(state: CompressionState, ranks: list[Any], **extra: Any) -> dict[str, Any]:
    """What a checkpoint holds: format, world size, the config that ran, ``extra`` entries and every rank's state."""
    return {"format": 1, "world_size": state.world_size, "config": state.config.to_dict(), **extra, "ranks": ranks}


def saved_world_size(blob: Mapping[str, Any]) -> int:
    """The number of ranks whose state ``blob`` holds."""
    return int(blob["world_size"])


def load_own_rank(state: CompressionState, blob: Mapping[str, Any]) -> None:
    """Load this rank's entry of ``blob`` into ``state`` (the last one when the checkpoint had fewer ranks)."""
    ranks = blob["ranks"]
    state.load_state_dict(ranks[min(state.rank, len(ranks) - 1)])


# ----- following the loss scale -------------------------------------------------------------------
def current_scale(scaler: Any) -> float | None:
    """The loss scale of a ``GradScaler`` that is on; ``None`` without one."""
    if scaler is None:
        return None
    enabled = scaler.is_enabled() if hasattr(scaler, "is_enabled") else True
    return scaler.get_scale() if enabled else None


def follow_loss_scale(
    state: CompressionState | None, before: float | None, after: float, say: Callable[[float, float], None]
) -> None:
    """Rescale ``state``'s memory when the loss scale went from ``before`` to ``after``.

    Memory holds loss-scaled gradients: kept in the units the next backward uses, every scale change (growth,
    or a skipped overflow step) would otherwise poison it. ``say(before, after)`` logs the change first.
    """
    if state is None or before is None or after == before:
        return
    say(before, after)
    state.rescale_memory(after / before)
