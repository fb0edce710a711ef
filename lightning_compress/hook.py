"""The DDP communication hook and ``register_compression``.

This is the only module that knows about DDP's ``GradBucket``.
"""


from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kernels.finite import all_finite
from lightning_compress.config import CompressionConfig
from lightning_compress.exchange import CompressedFlight, DenseFlight, Flight, commit_velocities, dense_inputs
from lightning_compress.momentum import Prepared
from lightning_compress.state import CompressionState

__all__ = ["compression_hook", "register_compression"]

_ATTR = "_lightning_compress_state"


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

    Usually registered through :func:`register_compression`; by hand it is::

        names = {id(p): n for n, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(CompressionState(CompressionConfig(), names), compression_hook)
    """
    buffer = bucket.buffer()
    params, grads = bucket.parameters(), bucket.gradients()
    if bucket.index() == 0:
        state.pipeline.reset()  # buckets are handed over in order: anything left is from a step that raised
    chosen = [i for i, p in enumerate(params) if _compressible(state, p)]
    state.record_bucket(buffer.numel() * buffer.element_size())
    prepared = _prepare_momentum(state, params, grads)
    flight: Flight
    if state.step < state.config.warmup_steps or not chosen:
        flight = DenseFlight(state, buffer, params, grads, prepared)
    elif state.adaptive is None and _memory_starts_here(state, params, chosen):
        # EF21/DIANA start from the gradient: one dense exchange sets every rank's memory.
        flight = DenseFlight(state, buffer, params, grads, prepared, start_memory=chosen)
    elif state.adaptive is not None:
        flight = _adaptive_exchange(state, params, grads, chosen, buffer, prepared)
    else:
        flight = CompressedFlight(state, params, grads, chosen, buffer, prepared)
    state.record_wait(state.pipeline.add(flight))
    if bucket.is_last() or not state.overlap:
        state.pipeline.drain(state)
    if bucket.is_last():
        state.finish_step()
    return flight.result


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
        RuntimeError: compression is already registered on this model.

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
    if config is None:
        config = CompressionConfig()
    elif isinstance(config, str):
        config = CompressionConfig.from_string(config)
    elif isinstance(config, Mapping):
        config = CompressionConfig.from_dict(config)
    elif not isinstance(config, CompressionConfig):
        raise TypeError(f"`config` must be a CompressionConfig, a dict or a 'key=value,...' string; got {type(config)}")
    names = {id(p): name for name, p in ddp_model.module.named_parameters()}
    state = CompressionState(config, names, process_group)
    _build_kernels()
    ddp_model.register_comm_hook(state, compression_hook)
    setattr(ddp_model, _ATTR, state)
    return state


def get_compression_state(ddp_model: DistributedDataParallel) -> CompressionState | None:
    """The state registered on ``ddp_model`` by :func:`register_compression`, if any."""
    return getattr(ddp_model, _ATTR, None)


def _build_kernels() -> None:
    """Build (or load) the CPU kernels now, not inside the first hook call."""
    from kernels import cpu

    cpu.prepare()
