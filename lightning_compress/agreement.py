"""Ranks agree on what must match, or every rank stops with an error that says what differs.

What every rank of one compressed exchange must hold alike is hashed, field by field, into a
fixed-size int64 vector (the *digest*): every :class:`~lightning_compress.CompressionConfig`
field, pending controller changes, the step counter, the world size, the parameters' names
and shapes (in order: seeds follow it), which tensors already hold EF21/DIANA estimates
(their first exchange is dense), where the optimizer's momentum lives, the adaptive
controller's state, and the node layout of a hierarchical exchange. One ``all_gather`` of the digests tells every rank whether they agree.
Only when they do not, ``all_gather_object`` brings every rank's readable values, and every
rank raises the same ``RuntimeError`` naming each differing field and each rank's value.

When the check runs (one small collective each time, never per step):

1. in :func:`~lightning_compress.register_compression`, which every rank calls at the same point;
2. in the hook, at bucket 0 of the first step after registration, and at bucket 0 of the first
   step after :meth:`~lightning_compress.CompressionState.load_state_dict` (which the Lightning,
   Fabric and Accelerate restore paths call) or after an optimizer or controller was attached.
   DDP hands bucket 0 over first, and the check runs before any other collective of the step;
   every rank runs the first step's check, so a checkpoint loaded on some ranks only before
   training is caught there, on every rank.

The digests travel over a gloo group of their own (the ranks of the exchange's group, created
once per group), never over the group that carries the gradients. That matters in the one
case no check without a per-step exchange can see in time: state loaded on some ranks only
*after* training started. Such a rank checks at its next step while its peers, which know of
no load, already wait for it in that step's first gradient collective. It never issues a
gradient collective its peers do not match (which gloo answers with an abort, a hang or
garbage): it waits at the check, and raises an error that says why. Once training has started
(this state passed a check at a step before) ranks reach a step's first bucket close together,
so that wait is bounded by :data:`AFTER_START_TIMEOUT_S` seconds (environment variable
``LIGHTNING_COMPRESS_CHECK_TIMEOUT``), not the process group's timeout (30 minutes by default).
When the rank that raised exits, its peers' pending gradient collective fails at once
(gloo: "Connection closed by peer"), so the whole job ends in seconds instead of hanging.
The checks at registration and at the first step wait for the process group's timeout:
ranks may start far apart (data loading, compilation).
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from dataclasses import fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lightning_compress.config import CompressionConfig

if TYPE_CHECKING:
    from lightning_compress.state import CompressionState

__all__ = ["AFTER_START_TIMEOUT_S", "FIELDS", "AgreementError", "check_agreement", "describe", "digest"]

# Newer PyTorch renames all_gather_into_tensor (and deprecates the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

log = logging.getLogger(__name__)

CONFIG_FIELDS = tuple(f.name for f in fields(CompressionConfig))
#: Everything the digest covers, one hash each, in this order.
FIELDS = (*CONFIG_FIELDS, "pending", "step", "world_size", "parameters", "memory", "momentum", "adaptive", "hierarchy")

#: Seconds a check waits for the other ranks once training has started (see the module docstring);
#: ``LIGHTNING_COMPRESS_CHECK_TIMEOUT`` overrides it. Never longer than the process group's timeout.
AFTER_START_TIMEOUT_S = 120.0
_TIMEOUT_ENV = "LIGHTNING_COMPRESS_CHECK_TIMEOUT"
_MIN_TIMEOUT_S = 0.001  # below a millisecond, timedelta rounds to 0, which would mean no bound

# id(exchange group) -> weak references to (that group, its gloo check group). Weak: torch's registry owns
# both, and destroy_process_group ends them; a reference here must not keep them alive past that.
_CHECK_GROUPS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class AgreementError(RuntimeError):
    """The ranks of one compressed exchange disagree on settings, step or model."""


def describe(state: CompressionState) -> dict[str, Any]:
    """This rank's readable value of every field in :data:`FIELDS` (plain types)."""
    values: dict[str, Any] = {name: getattr(state.config, name) for name in CONFIG_FIELDS}
    values["block_size"] = state.config.block_size_resolved  # unset and set to its default value agree
    values["pending"] = dict(sorted(state._pending.items()))
    values["step"] = int(state.step)
    values["world_size"] = int(state.world_size)
    values["parameters"] = [(name, state.param_shapes.get(name)) for name in state.param_index]
    # EF21/DIANA start a tensor from one dense exchange when it has no estimate yet: which tensors
    # have one decides the collectives. Other schemes' memory is per rank and decides nothing.
    starts_dense = state.feedback.initial_memory(torch.zeros(1), torch.zeros(1)) is not None
    values["memory"] = sorted(state.memory) if starts_dense else []
    momentum = state.momentum
    values["momentum"] = None if momentum is None else {
        "optimizer": momentum.kind, "mode": momentum.mode, "steps_taken": momentum.steps_taken,
    }  # fmt: skip
    values["adaptive"] = None if state.adaptive is None else state.adaptive.controller.state_dict()
    # hierarchical=True: the node layout each rank resolved (ranks_per_node may come from LOCAL_WORLD_SIZE)
    hierarchy = getattr(state, "hierarchy", None)
    values["hierarchy"] = None if hierarchy is None else hierarchy.describe(state.config)
    return values


def _hash(value: Any) -> int:
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def digest(values: dict[str, Any]) -> torch.Tensor:
    """One int64 hash per field of :data:`FIELDS`."""
    return torch.tensor([_hash(values[name]) for name in FIELDS], dtype=torch.int64)


def check_agreement(state: CompressionState, when: str, *, started: bool = False) -> None:
    """Compare this rank's digest with every other rank's of ``state``'s group; raise on a mismatch.

    A collective: every rank of the group must call it at the same point (see the module
    docstring for where the library does). Does nothing on a single process.

    Args:
        state: this rank's compression state.
        when: where the check runs, for the error message (e.g. ``"at registration"``).
        started: training has started (this state passed a check at an earlier step): wait for the
            other ranks at most :func:`after_start_timeout` instead of the process group's timeout.

    Raises:
        AgreementError: (a ``RuntimeError``) the ranks differ; the message names each differing
            field and every rank's value. Every rank raises it.
        RuntimeError: the other ranks did not reach the check in time (see ``started``).
    """
    if state.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    group, timeout = _check_group(state)
    bound = after_start_timeout() if started else None
    bounded = bound is not None and bound < timeout.total_seconds()
    if bounded:
        timeout = timedelta(seconds=bound)
    values = describe(state)
    mine = digest(values)
    gathered = torch.empty(state.world_size, mine.numel(), dtype=torch.int64)
    try:
        _all_gather_single(gathered.view(-1), mine, group=group, async_op=True).wait(timeout=timeout)
    except RuntimeError as err:
        skew = (
            f" Or the ranks reached this step more than {timeout} apart (a slow checkpoint read on some ranks): "
            f"raise the bound with {_TIMEOUT_ENV}=<seconds>."
            if bounded
            else ""
        )
        raise RuntimeError(
            f"lightning_compress: rank {state.rank}'s settings check {when} failed: the other ranks did not join it "
            f"within {timeout} ({err}). Either a peer stopped (see its log), or the others never reach this check: "
            "compression state loaded, or an optimizer or controller attached, on some ranks only after training "
            "started; the others, knowing of nothing, wait for this rank in the step's gradient exchange instead. "
            "Call CompressionState.load_state_dict (attach_optimizer, attach_gravac) on every rank, each with its "
            f"own state, at the same point of the loop.{skew} This rank holds step={state.step}. The process group "
            "cannot be used after this error: end the process."
        ) from err
    differing = [name for i, name in enumerate(FIELDS) if bool((gathered[:, i] != gathered[0, i]).any())]
    if not differing:
        return
    every: list[Any] = [None] * state.world_size
    dist.all_gather_object(every, {name: values[name] for name in differing}, group=group)
    raise AgreementError(_message(differing, every, when))


def after_start_timeout() -> float:
    """Seconds a check waits once training has started: ``LIGHTNING_COMPRESS_CHECK_TIMEOUT`` or
    :data:`AFTER_START_TIMEOUT_S`."""
    raw = os.environ.get(_TIMEOUT_ENV, "").strip()
    if not raw:
        return AFTER_START_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not _MIN_TIMEOUT_S <= seconds < float("inf"):
        raise ValueError(f"{_TIMEOUT_ENV} must be a number of seconds of at least {_MIN_TIMEOUT_S}; got {raw!r}")
    return seconds


def _message(differing: list[str], every: list[dict[str, Any]], when: str) -> str:
    lines = [
        (
            f"lightning_compress: the ranks disagree on {', '.join(differing)} ({when}). Every rank must register "
            "the same compression settings on the same model, attach the same kind of optimizer, and load its "
            "own saved state at the same point:"
        )
    ]
    for name in differing:
        per_rank = [v[name] for v in every]
        if name == "parameters":
            lines.append(f"  `parameters` (names and shapes, in order): {_parameters(per_rank)}")
        elif name == "memory":
            lines.append(f"  `memory` (tensors with EF21/DIANA estimates): {_memory(per_rank)}")
        else:
            lines.append(f"  `{name}`: {_by_rank(per_rank)}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranks(ranks: list[int]) -> str:
    """``rank 3`` or ``ranks 0-2,5``."""
    spans = [[ranks[0], ranks[0]]]
    for r in ranks[1:]:
        if r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _by_rank(per_rank: list[Any], show=_short) -> str:
    """``rank 0 'ef'; rank 1 'doublesqueeze'``, ranks with equal values grouped."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(per_rank):
        groups.setdefault(show(value), []).append(rank)
    return "; ".join(f"{_ranks(ranks)} {text}" for text, ranks in groups.items())


def _parameters(per_rank: list[list[tuple[str, Any]]]) -> str:
    longest = max(len(p) for p in per_rank)

    def entries(i: int) -> set:
        return {repr(p[i]) if i < len(p) else None for p in per_rank}

    first = next((i for i in range(longest) if len(entries(i)) > 1), longest)

    def show(params: list[tuple[str, Any]]) -> str:
        at = f"#{first} {params[first][0]!r} {tuple(params[first][1] or ())}" if first < len(params) else f"no #{first}"
        return f"{len(params)} tensors, {at}"

    return _by_rank(per_rank, show)


def _memory(per_rank: list[list[str]]) -> str:
    union = sorted(set().union(*per_rank))

    def show(names: list[str]) -> str:
        missing = [n for n in union if n not in names]
        return f"{len(names)} tensors" + (f" (not {_short(missing, 80)})" if missing else "")

    return _by_rank(per_rank, show)


def _check_group(state: CompressionState) -> tuple[Any, timedelta]:
    """The gloo group the digests travel on, and its timeout (the exchange group's)."""
    main = state.process_group if state.process_group is not None else dist.group.WORLD
    entry = _CHECK_GROUPS.get(id(main))
    group = entry[1]() if entry is not None and entry[0]() is main else None
    if group is not None and _alive(group):
        return group, _timeout(group)
    timeout = _timeout(main)
    # Only the members create a subgroup's check group; the default group's is created by all ranks.
    group = dist.new_group(
        dist.get_process_group_ranks(main), timeout=timeout, backend="gloo",
        use_local_synchronization=state.process_group is not None and main is not dist.group.WORLD,
    )  # fmt: skip
    _CHECK_GROUPS[id(main)] = (weakref.ref(main), weakref.ref(group))
    log.debug("lightning_compress: settings check group created (timeout %s)", timeout)
    return group, timeout


def _alive(group: Any) -> bool:
    try:
        return group in dist.distributed_c10d._world.pg_map
    except AttributeError:  # another torch layout: assume it lives
        return True


def _timeout(group: Any) -> timedelta:
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return dist.default_pg_timeout
