"""The DDP communication hook and ``register_compression``.

This is the only module that knows about DDP's ``GradBucket``.
"""


from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kernels.finite import all_finite
from lightning_compress.config import CompressionConfig
from lightning_compress.state import CompressionState
from lightning_compress.transport import Source, exchange, shard_size

__all__ = ["compression_hook", "register_compression"]

_ATTR = "_lightning_compress_state"


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _dense_allreduce(state: CompressionState, tensor: torch.Tensor) -> None:
    # Divide first, as DDP's default hook does, so low-precision buckets do not overflow.
    tensor.div_(state.world_size)
    state.collectives.allreduce_(tensor)


def _compressible(state: CompressionState, param: torch.Tensor) -> bool:
    return param.dim() > 1 and param.numel() >= max(state.config.min_numel, 1)


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Compressed, error-compensated averaging of one DDP gradient bucket.

    1. During warm-up, or when no tensor of the bucket is compressible (1-D or smaller than
       ``min_numel``), the bucket is averaged densely.
    2. Otherwise each compressible gradient ``x = grad / world`` goes through the feedback
       scheme (``v = x + e`` for EF), is compressed, and the transport sums the decoded
       payloads of all ranks; the remaining tensors are averaged densely.
    3. If any rank's bucket holds inf/NaN, every rank learns it from a flag in the payload
       and the whole bucket is averaged densely instead, leaving memory untouched, so a
       gradient scaler sees the overflow and skips the step.
    4. Memory is written only after a successful exchange. The last bucket closes the step.

    Usually registered through :func:`register_compression`; by hand it is::

        names = {id(p): n for n, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(CompressionState(CompressionConfig(), names), compression_hook)
    """
    buffer = bucket.buffer()
    params, grads = bucket.parameters(), bucket.gradients()
    chosen = [i for i, p in enumerate(params) if _compressible(state, p)]
    state.record_bucket(buffer.numel() * buffer.element_size())
    if state.step < state.config.warmup_steps or not chosen:
        _dense_allreduce(state, buffer)
    elif state.adaptive is not None:
        _adaptive_exchange(state, params, grads, chosen, buffer)
    else:
        _compressed_exchange(state, params, grads, chosen, buffer)
    if bucket.is_last():
        state.finish_step()
    return _done(buffer)


def _compressed_exchange(state, params, grads, chosen, buffer) -> None:
    world, comp, fb = state.world_size, state.compressor, state.feedback
    names, xs = _scaled_inputs(state, params, grads, chosen)
    sources, mems, vs = [], [], []
    for name, x in zip(names, xs):
        mem = state.memory_for(name, x.numel(), x.device)
        xin, res = fb.compress_args(x, mem)
        error = state.scratch(name, "error", x.numel(), x.device) if fb.memory_keys else None
        sources.append(Source(xin, res, error, aggregate_out=state.scratch(name, "agg", x.numel(), x.device)))
        mems.append(mem)
        vs.append(xin)
    local_finite = all_finite(buffer)

    kwargs: dict[str, Any] = {}
    seeds = [state.seed(n) if comp.shared_randomness else state.rank_seed(n) for n in names]
    if state.transport == "two_pass":
        server = None
        if state.config.feedback == "doublesqueeze":
            server = []
            for name, src in zip(names, sources):
                s = shard_size(src.numel(), world)
                mem = state.server_memory.get(name)
                server.append(mem if mem is not None and mem.numel() == s else src.x.new_zeros(s))
        pick = state.seed if comp.shared_randomness else state.rank_seed
        kwargs = dict(
            server_memory=server,
            shard_seed=lambda i, j: pick(names[i], j),
            server_seed=lambda i, r: state.seed(names[i], state.world_size + r),
        )
    result = exchange(state.transport, state.collectives, comp, sources, seeds, local_finite, **kwargs)

    if not result.finite:
        _dense_allreduce(state, buffer)
        return
    for k, (name, src, v, mem, agg) in enumerate(zip(names, sources, vs, mems, result.aggregates)):
        out, shared = fb.result(agg, mem)
        grads[chosen[k]].copy_(out.view_as(grads[chosen[k]]))
        update = fb.worker_update(v, src.error_out, mem)
        for key, tensor in update.items():
            if tensor is src.error_out:  # the error buffer becomes memory: recycle the old memory as buffer
                state.give_scratch(name, "error", mem[key])
        mem.update(update)
        mem.update(shared)
        if result.server_memory:
            state.server_memory[name] = result.server_memory[k]
    _dense_rest(state, grads, chosen)
    state.record_compression(result.err_sq, result.norm_sq)


def _dense_rest(state, grads, chosen) -> None:
    """Average the gradients of the bucket that are not compressed, in one allreduce."""
    chosen_set = set(chosen)
    rest = [g for i, g in enumerate(grads) if i not in chosen_set]
    if rest:
        flat = torch.cat([g.reshape(-1) for g in rest])
        _dense_allreduce(state, flat)
        for g, piece in zip(rest, torch.split(flat, [g.numel() for g in rest])):
            g.copy_(piece.view_as(g))


def _scaled_inputs(state, params, grads, chosen) -> tuple[list[str], list[torch.Tensor]]:
    names = [state.param_names[id(params[i])] for i in chosen]
    xs = []
    for i, name in zip(chosen, names):
        g = grads[i].detach().reshape(-1)
        # x = grad / world in a buffer kept between steps (no fresh allocation per step).
        x = state.scratch(name, "x", g.numel(), g.device)
        if g.dtype == torch.float32:
            xs.append(torch.div(g, state.world_size, out=x))
        else:  # low-precision gradient: widen first, then divide in fp32
            xs.append(x.copy_(g).div_(state.world_size))
    return names, xs


def _adaptive_exchange(state, params, grads, chosen, buffer) -> None:
    """GraVAC: the attached controller picks the compression factor (see ``adaptive``)."""
    names, xs = _scaled_inputs(state, params, grads, chosen)
    aggregates = state.adaptive.exchange(state, names, xs, all_finite(buffer))
    if aggregates is None:
        state.adaptive.skip_step()
        _dense_allreduce(state, buffer)
        return
    for i, agg in zip(chosen, aggregates):
        grads[i].copy_(agg.view_as(grads[i]))
    _dense_rest(state, grads, chosen)
    state.record_compression(state.adaptive.bucket_err, state.adaptive.bucket_norm)


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
    ddp_model.register_comm_hook(state, compression_hook)
    setattr(ddp_model, _ATTR, state)
    return state


def get_compression_state(ddp_model: DistributedDataParallel) -> CompressionState | None:
    """The state registered on ``ddp_model`` by :func:`register_compression`, if any."""
    return getattr(ddp_model, _ATTR, None)
