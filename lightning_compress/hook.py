"""The DDP communication hook and ``register_compression``.

This is the only module that knows about DDP's ``GradBucket``.
"""


import logging
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.agreement import after_start_timeout, check_agreement
from lightning_compress.config import CompressionConfig, build_config
from lightning_compress.exchange import CompressedFlight, DenseFlight, Flight, commit_velocities, dense_inputs
from lightning_compress.feedback import EF21
from lightning_compress.hierarchy import HierarchicalFlight
from lightning_compress.momentum import Prepared
from lightning_compress.state import CompressionState
from lightning_compress_kernels.finite import all_finite

__all__ = ["compression_hook", "register_compression"]

log = logging.getLogger(__name__)

_ATTR = "_lightning_compress_state"
# Top-k and DGC payloads carry int32 indices.
_MAX_INDEXED_NUMEL = 2**31 - 1
_INDEXED = ("topk", "dgc")


def _compressible(state: CompressionState, param: torch.Tensor) -> bool:
    return param.dim() > 1 and param.numel() >= max(state.config.min_numel, 1)


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Compressed, error-compensated averaging of one DDP gradient bucket, overlapped with backward.

    1. During warm-up, or when no tensor of the bucket is compressible (1-D or smaller than
       ``min_numel``), the bucket is averaged densely (asynchronously, like DDP's own hook).
    2. Otherwise each compressible gradient ``x = grad / world`` goes through the feedback
       scheme (``v = x + e`` for EF) and is compressed in one fused pass; the transport's
       collective is launched and the hook returns at once. When it completes, a callback sums
       the decoded payloads of all ranks straight into the bucket; the remaining tensors are
       averaged densely beside it.
    3. If any rank's bucket holds inf/NaN, or a scale or norm overflowed, every rank learns it
       from a flag in the payload; the last bucket's call then averages that bucket densely on
       every rank, leaving memory untouched, so a gradient scaler sees the overflow and skips
       the step.
    4. Memory is written only after a successful exchange. The last bucket closes the step:
       it waits for every bucket in flight (see :mod:`lightning_compress.exchange`).
    5. At bucket 0 of the first step, and of the first step after a checkpoint was loaded or an
       optimizer or controller attached, the ranks first compare their settings, step and model
       (:mod:`lightning_compress.agreement`) and all raise if they differ.
    6. Sparse gradients (``nn.Embedding(sparse=True)``) are averaged uncompressed, as DDP does.

    Usually registered through :func:`register_compression`; by hand it is::

        names = {id(p): n for n, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(CompressionState(CompressionConfig(), names), compression_hook)
    """
    buffer = bucket.buffer()
    params, grads = bucket.parameters(), bucket.gradients()
    if bucket.index() == 0:
        # DDP hands bucket 0 over first: no other collective of this step has been issued yet.
        when = state.agreement_due()
        if when is not None:
            check_agreement(state, when, started=state.started)
            state.agreed()
        state.pipeline.reset()  # buckets are handed over in order: anything left is from a step that raised
        if isinstance(state.feedback, EF21):  # its step follows the optimizer attached (CompressionState.ef21_step)
            state.feedback.step = state.ef21_step()
    flight: Flight
    if buffer.is_sparse:  # DDP hands sparse gradients over in a bucket of their own, no dense views
        flight = _sparse_flight(state, buffer, params)
    else:
        chosen = [i for i, p in enumerate(params) if _compressible(state, p)]
        state.record_bucket(buffer.numel() * buffer.element_size())
        prepared = _prepare_momentum(state, params, grads)
        if state.step < state.config.warmup_steps:
            flight = DenseFlight(state, buffer, params, grads, prepared)
        elif not chosen:  # small tensors only: summed in rank order, so a resumed run adds them alike
            flight = DenseFlight(state, buffer, params, grads, prepared, ordered=True)
        elif state.adaptive is None and _memory_starts_here(state, params, chosen):
            # EF21/DIANA start from the gradient: one dense exchange sets every rank's memory.
            flight = DenseFlight(state, buffer, params, grads, prepared, start_memory=chosen)
        elif state.adaptive is not None:
            flight = _adaptive_exchange(state, params, grads, chosen, buffer, prepared)
        elif state.hierarchy is not None:  # dense inside each node, compressed across nodes
            flight = HierarchicalFlight(state, params, grads, chosen, buffer, prepared)
        else:
            flight = CompressedFlight(state, params, grads, chosen, buffer, prepared)
    state.record_wait(state.pipeline.add(flight))
    if bucket.is_last() or not state.overlap:
        state.pipeline.drain(state)
    if bucket.is_last():
        state.finish_step()
    return flight.result


def _sparse_flight(state: CompressionState, buffer: torch.Tensor, params) -> Flight:
    """A sparse gradient's bucket, averaged uncompressed by a sparse allreduce (as DDP does without a hook)."""
    momentum = state.momentum
    for p in params:
        if momentum is not None and momentum.manages(p):
            raise RuntimeError(
                f"lightning_compress: parameter {state.param_names[id(p)]!r} gets sparse gradients, and the "
                f"optimizer's momentum (momentum={state.config.momentum!r}, moved into the exchange as "
                f"{momentum.mode!r}) cannot run on them. Use `momentum='optimizer'` to keep the momentum in the "
                "optimizer, or a dense embedding (sparse=False), whose gradient is compressed like the others."
            )
    start = time.perf_counter()
    nbytes = buffer._values().numel() * buffer._values().element_size() + buffer._indices().numel() * 8
    state.record_bucket(nbytes)
    comm = state.collectives
    comm.bytes_handed += nbytes
    comm.bytes_sent += nbytes * (state.world_size - 1)  # gloo's sparse allreduce gathers every rank's entries
    flight = Flight(buffer)
    shared = buffer / state.world_size
    if state.world_size == 1:
        flight.result.set_result(shared)
    else:
        work = dist.all_reduce(shared, group=state.process_group, async_op=True)
        flight.result = work.get_future().then(lambda fut: fut.value()[0])
    flight.done = flight.result
    flight.hook_seconds = time.perf_counter() - start
    return flight


def _memory_starts_here(state, params, chosen) -> bool:
    """The feedback scheme starts from a dense exchange and some tensor of the bucket has no memory yet."""
    if state.feedback.initial_memory(torch.zeros(1), torch.zeros(1)) is None:
        return False
    for i in chosen:
        mem = state.memory.get(state.param_names[id(params[i])])
        if mem is None or any(t.numel() != params[i].numel() for t in mem.values()):
            return True
    return False


def _prepare_momentum(state, params, grads) -> dict[int, Prepared]:
    """The optimizer's momentum moved into the exchange: ``s_i`` per managed parameter (see ``momentum``)."""
    if state.momentum is None:
        return {}
    return {
        i: state.momentum.prepare(state, state.param_names[id(p)], p, grads[i], state.world_size)
        for i, p in enumerate(params)
        if state.momentum.manages(p)
    }


def _dense_rest(state, grads, chosen, prepared) -> None:
    """Average the gradients of the bucket that are not compressed, in one allreduce (waits)."""
    chosen_set = set(chosen)
    rest = [i for i in range(len(grads)) if i not in chosen_set]
    if rest:
        flat = dense_inputs(grads, rest, prepared, state.world_size)
        state.collectives.allreduce_(flat)
        for i, piece in zip(rest, torch.split(flat, [grads[i].numel() for i in rest])):
            grads[i].copy_(piece.view_as(grads[i]))


def _adaptive_exchange(state, params, grads, chosen, buffer, prepared) -> Flight:
    """GraVAC: the attached controller picks the compression factor (see ``adaptive``); waits."""
    names = [state.param_names[id(params[i])] for i in chosen]
    xs = []
    for i, name in zip(chosen, names):
        if i in prepared:
            xs.append(prepared[i].s)
            continue
        g = grads[i].detach().reshape(-1)
        x = state.scratch(name, "x", g.numel(), g.device)
        xs.append(torch.div(g, state.world_size, out=x) if g.dtype == torch.float32 else x.copy_(g).div_(state.world_size))
    flight = Flight(buffer)
    finite = all_finite(buffer) and all(all_finite(p.s) for p in prepared.values())
    aggregates = state.adaptive.exchange(state, names, xs, finite)
    if aggregates is None:
        state.adaptive.skip_step()
        flight.fallback(state.collectives, state.world_size)
        return flight
    for i, agg in zip(chosen, aggregates):
        grads[i].copy_(agg.view_as(grads[i]))
    _dense_rest(state, grads, chosen, prepared)
    commit_velocities(state, params, prepared)
    state.record_compression(state.adaptive.bucket_err, state.adaptive.bucket_norm)
    flight.result.set_result(buffer)
    return flight


def register_compression(
    ddp_model: DistributedDataParallel,
    config: CompressionConfig | Mapping[str, Any] | str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> CompressionState:
    """Register compressed gradient exchange on a DDP model; returns its state.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model without a comm hook.
        config: a :class:`CompressionConfig`, a dict of its fields, or the inline form
            ``"compressor=sign,feedback=ef"``; ``None`` means the defaults.
        process_group: the group DDP reduces over; ``None`` for the default group.

    Returns:
        The :class:`CompressionState`: ``.stats`` for bytes and gain, ``.state_dict()`` for
        checkpoints, ``.request_update()`` for controllers.

    Raises:
        TypeError: ``ddp_model`` is not a DDP model, or ``config`` is of an unsupported type.
        ValueError: ``compressor`` is ``topk`` or ``dgc`` (int32 indices) and a tensor it would
            compress has 2**31 elements or more.
        RuntimeError: compression is already registered on this model, or the ranks' settings,
            step or model differ (see :mod:`lightning_compress.agreement`; every rank raises).

    A collective: every rank calls it at the same point. Parameters with sparse gradients
    (``nn.Embedding(sparse=True)``) are averaged uncompressed, as DDP does.

    Example (inside an initialized process group)::

        ddp = DistributedDataParallel(model)
        state = register_compression(ddp, "compressor=topk,density=0.01,feedback=ef21")
        ...  # train as usual
        print(state.stats.ratio, state.stats.gain)
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"register_compression needs a torch.nn.parallel.DistributedDataParallel model; got {type(ddp_model).__name__}"
        )
    if getattr(ddp_model, _ATTR, None) is not None:
        raise RuntimeError(
            "compression is already registered on this DDP model (DDP accepts one comm hook); "
            "use the CompressionState returned by the first register_compression call"
        )
    config = build_config(config)
    named = list(ddp_model.module.named_parameters())
    _check_index_range(config, named)
    names = {id(p): name for name, p in named}
    shapes = {name: tuple(p.shape) for name, p in named}
    state = CompressionState(config, names, process_group, param_shapes=shapes)
    sparse = _sparse_parameters(ddp_model.module)
    if sparse and state.rank == 0:
        log.warning(
            "lightning_compress: %s get sparse gradients; they are averaged uncompressed (a sparse allreduce, as "
            "DDP does). With sparse=False they would be compressed like the other tensors.",
            sparse,
        )
    _build_kernels()
    after_start_timeout()  # a bad LIGHTNING_COMPRESS_CHECK_TIMEOUT fails here, not in the middle of training
    check_agreement(state, "at registration")
    ddp_model.register_comm_hook(state, compression_hook)
    setattr(ddp_model, _ATTR, state)
    return state


def _check_index_range(config: CompressionConfig, named) -> None:
    """Top-k and DGC send int32 indices: refuse a tensor they would compress that has more entries."""
    if config.compressor not in _INDEXED:
        return
    for name, p in named:
        if p.dim() > 1 and p.numel() >= max(config.min_numel, 1) and p.numel() > _MAX_INDEXED_NUMEL:
            raise ValueError(
                f"parameter {name!r} has {p.numel()} elements; `compressor={config.compressor!r}` sends int32 "
                f"indices and compresses tensors of at most 2**31 - 1 = {_MAX_INDEXED_NUMEL} elements. Use "
                "compressor 'randk', 'sign' or 'qsgd' (no indices on the wire), or set `min_numel` above "
                f"{p.numel()} to exchange it densely."
            )


def _sparse_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters DDP expects sparse gradients for (its own rule: sparse embeddings)."""
    found = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse:
            found.extend(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False))
    return found


def get_compression_state(ddp_model: DistributedDataParallel) -> CompressionState | None:
    """The state registered on ``ddp_model`` by :func:`register_compression`, if any."""
    return getattr(ddp_model, _ATTR, None)


def _build_kernels() -> None:
    """Build (or load) the CPU kernels now, not inside the first hook call."""
    from lightning_compress_kernels import cpu

    cpu.prepare()
