"""One step's bucket exchanges in flight: launched by the hook, finished by callbacks.

The DDP hook hands every bucket to a *flight* and returns the flight's future at once, so
the backward pass (and the next buckets' compression) goes on while the bucket travels:

1. ``launch`` (hook thread): compress the bucket's tensors into one wire buffer in a fused
   pass per tensor (``v = grad / world + memory``, payload and new memory written together),
   note non-finite values from the compressor's own sums, and issue the collective with
   ``async_op=True``; the tensors that stay dense go in one allreduce beside it.
2. ``finish`` (the collective's completion callback): read every rank's flag; if all are
   finite, decode and sum the payloads straight into the bucket, write the dense tensors
   back, commit the new memory, and complete the future DDP waits on. A callback never issues
   a collective.
3. The two-pass transport's second collective (and DoubleSqueeze's server step) is issued by
   the hook thread too: by the next bucket's hook call, or by the last one.
4. The last bucket's hook call *drains* the step: it issues what is left, waits for every
   flight, and, in bucket order, averages densely every bucket some rank could not send
   finite (memory untouched), so every rank issues the same collectives in the same order.

Memory is only ever written in ``finish`` after every rank's data was seen finite, into
buffers that become the memory only then; a failed bucket leaves it exactly as it was.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from lightning_compress.powersgd import PowerSGDTransport, bucket_shapes, factors_for
from lightning_compress.transport import (
    TRANSPORTS,
    Batch,
    Collectives,
    Transport,
    TwoPassTransport,
    done_future,
    shard_bounds,
)
from lightning_compress_kernels.finite import all_finite
from lightning_compress_kernels.velocity import Velocity

if TYPE_CHECKING:
    from lightning_compress.state import CompressionState

__all__ = ["Flight", "DenseFlight", "CompressedFlight", "StepPipeline"]


class Flight:
    """One bucket on its way. ``result`` is what the hook returns to DDP."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.result: torch.futures.Future = torch.futures.Future()
        self.done: torch.futures.Future = done_future(None)  # completes after the last callback ran
        self.failed = False  # some rank's data was not finite: the drain averages it densely
        self.hook_seconds = 0.0
        self.callback_seconds = 0.0
        self.norm_sq: torch.Tensor | None = None
        self.err_sq: torch.Tensor | None = None

    def issue_next(self) -> float:
        """Issue a pending later collective, if any (hook thread); returns seconds waited."""
        return 0.0

    def stages_left(self) -> bool:
        """Collectives are left that :meth:`issue_next` issues one per call (a hierarchical flight's stages)."""
        return False

    def _complete(self, fut: torch.futures.Future, arrived_ok) -> None:
        """The last collective's completion callback: re-raise its failure; if ``arrived_ok()`` (every
        rank's data was finite) commit and complete the result, else leave the bucket to the drain's
        dense fallback. Never issues a collective."""
        start = time.perf_counter()
        try:
            fut.wait()  # re-raises a failed collective
            if not arrived_ok():
                self.failed = True
                return
            self._commit()
            self.result.set_result(self.buffer)
        except BaseException as exc:
            if not self.result.done():
                self.result.set_exception(exc)
            raise
        finally:
            self.callback_seconds += time.perf_counter() - start

    def _commit(self) -> None:
        """Write the result and the new memory (see :meth:`_complete`)."""
        raise NotImplementedError

    def fallback(self, comm: Collectives, world_size: int) -> None:
        """Average the untouched bucket densely and complete the result (hook thread, waits)."""
        self.buffer.div_(world_size)
        comm.allreduce_(self.buffer)
        self.result.set_result(self.buffer)


def dense_inputs(grads, indices: list[int], prepared: dict, world: int) -> torch.Tensor:
    """One flat buffer of what the dense allreduce sums for ``grads[indices]``: ``grad / world``,
    or a momentum parameter's ``s_i`` (already divided)."""
    parts = [prepared[i].s if i in prepared else grads[i].reshape(-1) for i in indices]
    flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    if len(prepared) < len(indices):
        at = 0
        for i in indices:
            n = grads[i].numel()
            if i not in prepared:
                flat[at : at + n].div_(world)
            at += n
    return flat


def sum_dense_async(state: CompressionState, tensor: torch.Tensor) -> torch.futures.Future:
    """Sum the tensors that stay dense in a compressed step over ranks, in place.

    In rank order (:meth:`~lightning_compress.transport.Collectives.sum_ordered_async`) where the
    payloads are summed in rank order too (all_gather, two-pass), so that a resumed run adds them
    alike; beside the ``allreduce`` transport, whose payload sums follow the buffer's layout
    anyway, by allreduce.
    """
    comm = state.collectives
    return comm.allreduce_async(tensor) if state.transport == "allreduce" else comm.sum_ordered_async(tensor)


def commit_velocities(state: CompressionState, params, prepared: dict) -> None:
    """After a successful exchange: the momentum parameters' new velocities become theirs."""
    for i, p in prepared.items():
        name = state.param_names[id(params[i])]
        state.commit_velocity(name, p.velocity)
        if p.second is not None:
            state.commit_second_moment(name, p.second)


class DenseFlight(Flight):
    """Warm-up, or a bucket with nothing to compress: DDP's own average, asynchronously.

    With the optimizer's momentum in the exchange, its parameters send ``s_i`` instead of
    ``grad / world``, and their velocities are committed when the average arrives.
    """

    def __init__(self, state: CompressionState, buffer, params, grads, prepared: dict, start_memory=(), ordered=False):
        super().__init__(buffer)
        # s_i reads the undivided gradient (the gradient views are the bucket's own memory): form it first.
        moved = {i: p.s for i, p in prepared.items()}
        # Divide, as DDP's default hook does, so low-precision buckets do not overflow.
        buffer.div_(state.world_size)
        for i, s in moved.items():
            grads[i].copy_(s.view_as(grads[i]))
        # Feedback memory that starts from this exchange: this rank's share, before it is summed.
        shares = {i: grads[i].detach().reshape(-1).to(torch.float32, copy=True) for i in start_memory}

        def arrived(_):
            # Every rank holds the same average: all commit, or none (a step a loss scaler skips).
            if (prepared or shares) and all_finite(buffer):
                commit_velocities(state, params, prepared)
                for i, share in shares.items():
                    average = grads[i].detach().reshape(-1).to(torch.float32)
                    state.memory[state.param_names[id(params[i])]] = state.feedback.initial_memory(share, average)
            return buffer

        # ordered: a bucket of tensors that stay dense after warm-up (see sum_dense_async)
        sent = sum_dense_async(state, buffer) if ordered else state.collectives.allreduce_async(buffer)
        self.result = sent.then(arrived)
        self.done = self.result


class CompressedFlight(Flight):
    """A bucket with compressible tensors: the fused compress, the transport, the commit."""

    def __init__(self, state: CompressionState, params, grads, chosen: list[int], buffer: torch.Tensor, prepared: dict):
        super().__init__(buffer)
        start = time.perf_counter()
        self.state = state
        self.params, self.prepared = params, prepared
        world, comp, fb = state.world_size, state.compressor, state.feedback
        self.names = [state.param_names[id(params[i])] for i in chosen]
        flat = [grads[i].reshape(-1) for i in chosen]
        self.grads = flat
        device = buffer.device
        numels = [g.numel() for g in flat]
        self.mems = [state.memory_for(name, n, device) for name, n in zip(self.names, numels)]

        # x = grad / world: read in place by compressors that fuse the scale, else widened and scaled;
        # with the optimizer's momentum in the exchange, s_i (already divided) instead.
        fused = comp.fused_scale and all(g.dtype == torch.float32 and g.is_contiguous() for g in flat)
        velocity = _fused_velocity(comp, fb, chosen, prepared) if fused else None
        if velocity is not None:  # the compressor forms s_i from the gradients in its own pass
            xs, scale = flat, 1.0
        elif prepared:
            xs = [prepared[i].s if i in prepared else self._scaled(name, g, world)
                  for i, name, g in zip(chosen, self.names, flat)]  # fmt: skip
            scale = 1.0
        elif fused:
            xs, scale = flat, 1.0 / world
        else:
            xs = [self._scaled(name, g, world) for name, g in zip(self.names, flat)]
            scale = 1.0
        # Feedback: EF-like schemes hand (x, e) to the fused kernel; EF21/DIANA compress x - shift.
        if fb.fused_residual:
            residuals = [m[fb.memory_keys[0]] for m in self.mems] if fb.memory_keys else [None] * len(xs)
            self.vs = [None] * len(xs)
        else:
            if scale != 1.0:  # the shift is subtracted from x itself: x must exist
                xs = [self._scaled(name, g, world) for name, g in zip(self.names, flat)]
                scale = 1.0
            self.vs = [
                torch.sub(x, fb.shift(m), out=state.scratch(name, "v", x.numel(), device))
                for name, x, m in zip(self.names, xs, self.mems)
            ]
            xs, residuals = self.vs, [None] * len(xs)
        self.errors = [state.scratch(name, "error", n, device) if fb.memory_keys else None
                       for name, n in zip(self.names, numels)]  # fmt: skip
        # Where the sum over ranks goes: straight into the bucket when that is the result.
        self.direct = fb.direct_result and all(g.dtype == torch.float32 and g.is_contiguous() for g in flat)
        outs = flat if self.direct else [state.scratch(name, "agg", n, device) for name, n in zip(self.names, numels)]

        batch = Batch(comp, numels, outs, self._seed_of, device)
        self.transport = _make_transport(state, batch, self.names)
        wire = self.transport.new_wire()
        self.norm_sq, self.err_sq = self.transport.encode(wire, xs, residuals, self.errors, scale, velocity)
        finite = torch.isfinite(self.norm_sq)

        # The tensors that stay dense (1-D, small) travel in one allreduce beside the payloads.
        chosen_set = set(chosen)
        rest = [i for i in range(len(grads)) if i not in chosen_set]
        self.rest = [grads[i] for i in rest]
        futures = []
        if rest:
            self.rest_flat = dense_inputs(grads, rest, prepared, world)
            finite = finite & torch.isfinite(self.rest_flat).all()
            futures.append(sum_dense_async(state, self.rest_flat))
        self.transport.set_flag(wire, finite)
        futures.append(self.transport.launch(wire))
        first = torch.futures.collect_all(futures)
        if self.transport.passes == 1:
            self.done = first.then(self._finish)
            self._pending = None
        else:
            self._pending = first
        self.hook_seconds = time.perf_counter() - start

    # ----- helpers --------------------------------------------------------------------------
    def _scaled(self, name: str, g: torch.Tensor, world: int) -> torch.Tensor:
        x = self.state.scratch(name, "x", g.numel(), g.device)
        if g.dtype == torch.float32:
            return torch.mul(g, 1.0 / world, out=x)
        return x.copy_(g).mul_(1.0 / world)  # low precision: widen first, then scale in fp32

    def _seed_of(self, t: int, shard: int) -> int:
        state = self.state
        pick = state.seed if state.compressor.shared_randomness else state.rank_seed
        return pick(self.names[t], shard)

    # ----- later passes (hook thread) -----------------------------------------------------------
    def issue_next(self) -> float:
        if self._pending is None:
            return 0.0
        start = time.perf_counter()
        self._pending.wait()
        waited = time.perf_counter() - start
        self._pending = None
        transport: TwoPassTransport = self.transport  # type: ignore[assignment]
        if not transport.first_ok():
            self.failed = True
            return waited
        t0 = time.perf_counter()
        second = transport.launch_second()
        self.done = second.then(self._finish)
        self.hook_seconds += time.perf_counter() - t0
        return waited

    # ----- completion (callback thread) ---------------------------------------------------------
    def _finish(self, fut: torch.futures.Future) -> None:
        self._complete(fut, self.transport.finish)

    def _commit(self) -> None:
        state, fb = self.state, self.state.feedback
        if self.rest:
            for g, piece in zip(self.rest, torch.split(self.rest_flat, [g.numel() for g in self.rest])):
                g.copy_(piece.view_as(g))
        for t, (name, grad, mem, out) in enumerate(zip(self.names, self.grads, self.mems, self.transport.batch.outs)):
            error = self.errors[t]
            if fb.fused_residual:  # none, ef, doublesqueeze: the sum is the result, the error the new memory
                if not self.direct:
                    grad.copy_(out)
                update = fb.worker_update(self.vs[t], error, mem)
                for key, tensor in update.items():
                    if tensor is error:  # the error buffer becomes memory: the old memory is the next buffer
                        state.give_scratch(name, "error", mem[key])
                mem.update(update)
            else:  # EF21, DIANA: their memory moves in place, now that every rank's message arrived
                grad.copy_(fb.commit(out, self.vs[t], error, mem))
        self.transport.commit(state, self.names)
        commit_velocities(state, self.params, self.prepared)


def _fused_velocity(comp, fb, chosen: list[int], prepared: dict) -> Velocity | None:
    """The momentum of every compressed tensor, for a compressor that forms it in its own pass;
    ``None`` when that cannot be (one velocity setting per bucket, EF-like feedback only)."""
    if not (prepared and comp.fused_velocity and fb.fused_residual) or any(i not in prepared for i in chosen):
        return None
    if any(prepared[i].adam is not None for i in chosen):  # adam_step divides by the second moment first
        return None
    first = prepared[chosen[0]].scalars
    if any(prepared[i].scalars != first for i in chosen):
        return None
    return Velocity([prepared[i].p for i in chosen], [prepared[i].u_old for i in chosen],
                    [prepared[i].velocity for i in chosen], **first)  # fmt: skip


def _make_transport(state: CompressionState, batch: Batch, names: list[str]) -> Transport:
    kind = state.transport
    if state.config.compressor == "powersgd":  # its own two allreduces, with the shared factors
        shapes = bucket_shapes(state, names, batch.numels)
        factors, factors_out = factors_for(state, names, shapes, batch.device)
        return PowerSGDTransport(state.collectives, batch, shapes=shapes, factors=factors, factors_out=factors_out)
    if kind != "two_pass":
        return TRANSPORTS[kind](state.collectives, batch)
    server = server_out = None
    if state.config.feedback in ("ef", "doublesqueeze"):  # both passes compressed, with a server error per shard
        server, server_out = [], []
        for name, numel in zip(names, batch.numels):
            lo, hi = shard_bounds(numel, state.world_size, state.rank)
            mem = state.server_memory.get(name)
            server.append(mem if mem is not None and mem.numel() == hi - lo else torch.zeros(hi - lo, device=batch.device))
            server_out.append(state.scratch(name, "server_error", hi - lo, batch.device))
    return TwoPassTransport(
        state.collectives, batch, server_memory=server, server_out=server_out,
        server_seed=lambda i, r: state.seed(names[i], state.world_size + r),
    )  # fmt: skip


class StepPipeline:
    """The flights of the current step, in bucket order."""

    def __init__(self) -> None:
        self.flights: list[Flight] = []

    def add(self, flight: Flight) -> float:
        """Take a just-launched flight, then issue the earlier ones' later passes; returns seconds waited."""
        waited = 0.0
        for earlier in self.flights:
            waited += earlier.issue_next()
        self.flights.append(flight)
        return waited

    def reset(self) -> None:
        """Forget flights of a step that never finished (its backward pass raised)."""
        self.flights = []

    def drain(self, state: CompressionState) -> None:
        """Finish the step: issue what is left, wait for every flight, fall back densely in order."""
        flights, self.flights = self.flights, []
        start = time.perf_counter()
        for f in flights:
            f.issue_next()
        while any(f.stages_left() for f in flights):  # in bucket order, one stage per flight and round
            for f in flights:
                if f.stages_left():
                    f.issue_next()
        for f in flights:
            f.done.wait()  # re-raises what a callback raised
        for f in flights:
            if f.failed:
                f.fallback(state.collectives, state.world_size)
        wait = time.perf_counter() - start
        state.record_flights(flights, wait)
