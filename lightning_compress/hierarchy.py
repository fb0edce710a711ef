"""The hierarchical exchange: dense inside a node, compressed across nodes, with error feedback.

With ``CompressionConfig(hierarchical=True)`` the ``W`` ranks are ``N`` nodes of ``L`` ranks each,
numbered node by node as torchrun numbers them: rank ``r`` is local rank ``r % L`` of node ``r // L``.
``L`` is ``ranks_per_node``, or torchrun's ``LOCAL_WORLD_SIZE`` when that is 0 (see :func:`resolve_layout`).
A bucket's compressible tensors then travel in four stages, every collective issued from the hook's
thread (:meth:`HierarchicalFlight.issue_next`, one stage per call, as the two-pass transport's
second pass is):

1. inside the node, an all_to_all of ``x = grad / W`` in fp32: each tensor is cut into ``L`` shards
   (:func:`~lightning_compress.transport.shard_bounds`), local rank ``j`` receives every node-mate's
   shard ``j`` and adds them in local rank order (gloo has no reduce_scatter for every dtype, and a
   fixed order keeps the sum independent of DDP's bucket layout, so a resumed run adds alike);
2. across nodes, over the group of the ranks with this local index (one per node): error feedback
   ``v = node sum + e`` (``e`` this rank's memory, of shard size), compressed and sent with the flat
   transport ``config.transport_for(N)`` (allreduce, all_gather, or two passes with a server error
   per sub-shard for ``ef``/``doublesqueeze``), decoded and summed over nodes in the collective's
   completion callback (which issues nothing): shard ``j`` of the average;
3. inside the node, an all_gather of every local rank's averaged shard in fp32, with a flag;
4. the completion callback writes the shards into the bucket and commits the memory.

Only stage 2 crosses nodes, and it carries compressed shards of ``1/L`` of the tensors: with 2 nodes
each rank sends one compressed shard across, against about 1.5 compressed tensors for the flat
two-pass exchange on 4 ranks. The tensors that stay dense (1-D, small) are summed over all ranks in
rank order, as the flat exchange sums them (:meth:`~lightning_compress.collectives.Collectives.sum_ordered_async`).

Failure: a non-finite value anywhere in shard ``j`` (an input, a scale, a norm, the aggregate) sets
the flag of stage 2 in group ``j``, whose members all see it and pass it on in stage 3, so every rank
of every node sees every shard's flag; with the dense tensors' sum (identical on every rank) that
decides, alike everywhere, whether the bucket is committed or averaged densely by the drain, memory
untouched. Memory is written only in the callback, after that decision.

Feedback: ``none``, ``ef`` and ``doublesqueeze``; EF21 and DIANA are refused by the config (their
estimates are of whole tensors shared by all ranks). GraVAC is refused at attach time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lightning_compress.collectives import done_future
from lightning_compress.exchange import Flight, commit_velocities, dense_inputs
from lightning_compress.nodes import (  # noqa: F401  (the layout's names are re-exported here)
    Hierarchy,
    NodeLayout,
    expected_sent,
    make_hierarchy,
    node_layout,
    resolve_layout,
)
from lightning_compress.transport import TRANSPORTS, Batch, Transport, TwoPassTransport, shard_bounds, shard_size
from lightning_compress_kernels.finite import all_finite

if TYPE_CHECKING:
    from lightning_compress.state import CompressionState

__all__ = ["Hierarchy", "HierarchicalFlight", "NodeLayout", "expected_sent", "make_hierarchy", "node_layout",
           "resolve_layout"]

# Mixed into the cross-node seeds so they differ from the flat exchange's (tensor, shard) seeds.
_SEED_SALT = 0x4E0DE


# ----- one bucket -------------------------------------------------------------------------------------------
class HierarchicalFlight(Flight):
    """A bucket with compressible tensors, exchanged in the four stages of the module docstring."""

    def __init__(self, state: CompressionState, params, grads, chosen: list[int], buffer: torch.Tensor, prepared: dict):
        super().__init__(buffer)
        start = time.perf_counter()
        h: Hierarchy = state.hierarchy
        self.state, self.h = state, h
        self.params, self.prepared = params, prepared
        world, per = state.world_size, h.layout.ranks_per_node
        device = buffer.device
        self.names = [state.param_names[id(params[i])] for i in chosen]
        self.grads = [grads[i].reshape(-1) for i in chosen]
        numels = [g.numel() for g in self.grads]
        self.bounds = [[shard_bounds(n, per, j) for j in range(per)] for n in numels]
        # Row j of the node buffers: shard j of every tensor, each at its offset (padded to the longest shard).
        self.offsets, at = [], 0
        for n in numels:
            self.offsets.append(at)
            at += shard_size(n, per)
        self.row = at
        # Contents between the shards are never read: a reused buffer needs no zeroing.
        send = state.scratch(self.names[0], "node_send", per * self.row, device).view(per, self.row)
        for t, i in enumerate(chosen):
            src = prepared[i].s.reshape(-1) if i in prepared else self.grads[t]
            scale = 1.0 if i in prepared else 1.0 / world  # s_i is divided already
            for j, (lo, hi) in enumerate(self.bounds[t]):
                dst = send[j, self.offsets[t] : self.offsets[t] + hi - lo]
                if src.dtype == torch.float32:
                    torch.mul(src[lo:hi], scale, out=dst)
                else:  # low precision: widen first, then scale in fp32
                    dst.copy_(src[lo:hi]).mul_(scale)

        # The tensors that stay dense: summed over all ranks in rank order, as the flat exchange does.
        chosen_set = set(chosen)
        rest = [i for i in range(len(grads)) if i not in chosen_set]
        self.rest = [grads[i] for i in rest]
        self.rest_flat: torch.Tensor | None = None
        self._rest_future: torch.futures.Future | None = None
        if rest:
            self.rest_flat = dense_inputs(grads, rest, prepared, world)
            self._rest_future = state.collectives.sum_ordered_async(self.rest_flat)
        recv = state.scratch(self.names[0], "node_recv", per * self.row, device).view(per, self.row)
        self.received, self._stage = h.intra.all_to_all_async(send, recv)
        self._next: Any = self._across
        self.transport: Transport | None = None
        self._ok: bool | None = None
        self.hook_seconds = time.perf_counter() - start

    # ----- the stages (hook thread) ---------------------------------------------------------------------
    def stages_left(self) -> bool:
        return self._next is not None

    def issue_next(self) -> float:
        if self._next is None:
            return 0.0
        start = time.perf_counter()
        self._stage.wait()  # re-raises a failed collective
        waited = time.perf_counter() - start
        stage, self._next = self._next, None
        t0 = time.perf_counter()
        stage()
        self.hook_seconds += time.perf_counter() - t0
        return waited

    def _across(self) -> None:
        """Stage 2: this rank's shard summed over its node, compressed with its memory, sent across nodes."""
        state, h = self.state, self.h
        fb, comp = state.feedback, state.compressor
        device = self.buffer.device
        rows = self.received
        total = torch.add(rows[0], rows[1], out=state.scratch(self.names[0], "node_sum", self.row, device))
        for row in rows[2:]:  # in local rank order
            total.add_(row)
        # This rank's shard of every tensor; tensors smaller than the number of ranks per node may have none.
        self.active = [t for t, b in enumerate(self.bounds) if b[h.local][1] > b[h.local][0]]
        names = [self.names[t] for t in self.active]
        sizes = [self.bounds[t][h.local][1] - self.bounds[t][h.local][0] for t in self.active]
        xs = [total[self.offsets[t] : self.offsets[t] + m] for t, m in zip(self.active, sizes)]
        key = fb.memory_keys[0] if fb.memory_keys else None
        residuals, self.errors = [], []
        for name, m in zip(names, sizes):
            mem = state.memory.get(name, {}).get(key) if key else None
            residuals.append(None if key is None else mem if mem is not None and mem.numel() == m
                             else torch.zeros(m, device=device))  # fmt: skip
            self.errors.append(state.scratch(name, "node_error", m, device) if key else None)
        outs = [state.scratch(name, "node_agg", m, device) for name, m in zip(names, sizes)]
        pick = state.seed if comp.shared_randomness else state.rank_seed

        def seed_of(t: int, shard: int) -> int:
            return pick(names[t], shard, _SEED_SALT + h.local)

        batch = Batch(comp, sizes, outs, seed_of, device)
        self.transport = _cross_transport(state, h, batch, names)
        wire = self.transport.new_wire()
        self.norm_sq, self.err_sq = self.transport.encode(wire, xs, residuals, self.errors, 1.0)
        self.transport.set_flag(wire, torch.isfinite(self.norm_sq))
        # The row stage 3 sends: this rank's averaged shards (filled by _decode), then the flag.
        self.out_row = state.scratch(self.names[0], "node_row", self.row + 1, device)
        first = self.transport.launch(wire)
        if self.transport.passes == 2:
            self._stage, self._next = first, self._second
        else:
            self._stage, self._next = first.then(self._decode), self._gather

    def _second(self) -> None:
        """Stage 2b (two passes across nodes): the server step, when every node's first pass was finite."""
        transport: TwoPassTransport = self.transport  # type: ignore[assignment]
        if transport.first_ok():  # the same answer on every rank of this cross-node group
            self._stage = transport.launch_second().then(self._decode)
        else:
            self._ok, self._stage = False, done_future(None)
            self.out_row[self.row] = 1.0
        self._next = self._gather

    def _decode(self, fut: torch.futures.Future) -> None:
        """(callback) Decode the sum over nodes into this rank's row; an aggregate that overflowed is not kept."""
        start = time.perf_counter()
        try:
            fut.wait()  # re-raises a failed collective
            outs = self.transport.batch.outs
            ok = self.transport.finish()
            ok = ok and all(all_finite(o) for o in outs)
            if ok:
                for t, out in zip(self.active, outs):
                    self.out_row[self.offsets[t] : self.offsets[t] + out.numel()].copy_(out)
            self.out_row[self.row] = 0.0 if ok else 1.0
            self._ok = ok
        finally:
            self.callback_seconds += time.perf_counter() - start

    def _gather(self) -> None:
        """Stage 3: every local rank's averaged shard, and its flag, to the whole node."""
        per = self.h.layout.ranks_per_node
        out = self.state.scratch(self.names[0], "node_gathered", per * (self.row + 1), self.buffer.device)
        self.gathered, fut = self.h.intra.all_gather_async(self.out_row, out.view(per, self.row + 1))
        futures = [fut] if self._rest_future is None else [self._rest_future, fut]
        self.done = torch.futures.collect_all(futures).then(self._finish)

    # ----- completion (callback thread) ---------------------------------------------------------------------
    def _finish(self, fut: torch.futures.Future) -> None:
        self._complete(fut, self._arrived_finite)

    def _arrived_finite(self) -> bool:
        """Every shard's flag is clear, and the dense tensors' sum (the same on every rank) is finite."""
        if bool(self.gathered[:, self.row].any()):
            return False
        return self.rest_flat is None or all_finite(self.rest_flat)

    def _commit(self) -> None:
        state = self.state
        for t, grad in enumerate(self.grads):
            for j, (lo, hi) in enumerate(self.bounds[t]):
                if hi > lo:
                    grad[lo:hi].copy_(self.gathered[j, self.offsets[t] : self.offsets[t] + hi - lo])
        if self.rest:
            for g, piece in zip(self.rest, torch.split(self.rest_flat, [g.numel() for g in self.rest])):
                g.copy_(piece.view_as(g))
        key = state.feedback.memory_keys[0] if state.feedback.memory_keys else None
        server = getattr(self.transport, "new_server", None)
        for n, t in enumerate(self.active):
            name = self.names[t]
            if key is not None:  # the compression error becomes the memory; the old memory the next scratch buffer
                old = state.memory.get(name, {}).get(key)
                state.memory[name] = {key: self.errors[n]}
                if old is not None and old.numel() == self.errors[n].numel():
                    state.give_scratch(name, "node_error", old)
                else:
                    state._scratch.pop((name, "node_error"), None)
            if server:
                state.commit_buffer(state.server_memory, name, "server_error", server[n])
        commit_velocities(state, self.params, self.prepared)


def _cross_transport(state: CompressionState, h: Hierarchy, batch: Batch, names: list[str]) -> Transport:
    """The flat transport that carries the shards across nodes: ``config.transport_for(nodes)`` on the cross-node group."""
    nodes = h.layout.nodes
    kind = state.config.transport_for(nodes)
    if kind != "two_pass":
        return TRANSPORTS[kind](h.inter, batch)
    server = server_out = None
    if state.config.feedback in ("ef", "doublesqueeze"):  # both passes compressed, a server error per sub-shard
        server, server_out = [], []
        for name, numel in zip(names, batch.numels):
            lo, hi = shard_bounds(numel, nodes, h.node)
            mem = state.server_memory.get(name)
            server.append(mem if mem is not None and mem.numel() == hi - lo else torch.zeros(hi - lo, device=batch.device))
            server_out.append(state.scratch(name, "server_error", hi - lo, batch.device))
    return TwoPassTransport(
        h.inter, batch, server_memory=server, server_out=server_out,
        server_seed=lambda i, r: state.seed(names[i], nodes + r, _SEED_SALT + h.local),
    )  # fmt: skip
