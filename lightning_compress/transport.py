"""How payloads travel: allreduce, all_gather, and two-pass (all_to_all + all_gather).

A transport moves one bucket's wire buffer (every compressed tensor's payload, laid out by
:func:`~lightning_compress.compressors.base.wire_layout`, then one flag byte) and sums what
every rank sent. It is split in two halves so that the exchange overlaps the backward pass:

* ``launch`` runs on the thread that calls the DDP hook: it issues the collective with
  ``async_op=True`` and returns at once;
* ``finish`` runs when the collective completes (usually on the process group's thread): it
  reads the flags, decodes and sums, and never issues a collective.

The two-pass transport has a second collective that depends on the first one's result; its
``launch_second`` is again called from the hook's thread (see :mod:`lightning_compress.exchange`),
so every rank issues every collective in the same order.

Every rank issues the same collectives, in the same order and with the same sizes: sizes
depend only on tensor sizes and the config, and the one data-dependent decision (some rank
holds inf/NaN, or a scale or norm overflowed) is made from a flag that travels inside the
payload, so every rank sees every flag before it decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lightning_compress.collectives import Collectives, done_future
from lightning_compress.compressors import Compressor
from lightning_compress.compressors.base import WIRE_ALIGN, wire_layout

__all__ = [
    "Batch", "Collectives", "Layout", "TRANSPORTS", "TRANSPORT_NAMES", "Transport",
    "done_future", "send_encoded", "shard_bounds", "shard_size",
]  # fmt: skip

TRANSPORT_NAMES = ("allreduce", "allgather", "two_pass")


@dataclass
class Layout:
    """Where each tensor's payload lies in a wire buffer of ``payload_dtype`` elements.

    The flag (non-zero: this rank's data is not finite) is the element at ``flag``; the wire
    has ``total`` elements. For uint8 wires every payload starts at a multiple of
    ``WIRE_ALIGN`` bytes, and so does every rank's row of a gathered buffer.
    """

    offsets: list[int]
    flag: int
    total: int

    @classmethod
    def of(cls, compressor: Compressor, numels: Sequence[int]) -> "Layout":
        if compressor.payload_dtype == torch.uint8:
            offsets, end = wire_layout([compressor.payload_nbytes(n) for n in numels])
            return cls(offsets, end, end + WIRE_ALIGN)
        offsets, at = [], 0  # summable payloads (allreduce): elements of payload_dtype, back to back
        for n in numels:
            offsets.append(at)
            at += compressor.payload_numel(n)
        return cls(offsets, at, at + 1)


def shard_size(numel: int, world_size: int) -> int:
    """Elements per shard when a tensor of ``numel`` is cut into ``world_size`` shards."""
    return -(-numel // world_size)


def shard_bounds(numel: int, world_size: int, shard: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``shard`` of a tensor of ``numel`` elements (the last ones may be short)."""
    size = shard_size(numel, world_size)
    lo = min(shard * size, numel)
    return lo, min(lo + size, numel)


# ----- the per-bucket exchanges -------------------------------------------------------------
@dataclass
class Batch:
    """One bucket's compressed tensors as the transports see them.

    ``outs[t]`` receives the sum over ranks of tensor ``t``'s decoded payloads (fp32, flat).
    ``seed_of(t, j)`` seeds the compression of shard ``j`` of tensor ``t`` (``j`` is 0 when
    tensors are not sharded); for ``shared_randomness`` compressors it is the same on every
    rank, and decoding reads it.
    """

    compressor: Compressor
    numels: list[int]
    outs: list[torch.Tensor]
    seed_of: Callable[[int, int], int]
    device: torch.device


class Transport:
    """Base of the three transports: a bucket's tensors in, every rank's sum out."""

    passes = 1

    def __init__(self, comm: Collectives, batch: Batch):
        self.comm = comm
        self.batch = batch
        self.layout = Layout.of(batch.compressor, batch.numels)

    def new_wire(self) -> torch.Tensor:
        """A zeroed wire buffer this transport sends."""
        return torch.zeros(self.layout.total, dtype=self.batch.compressor.payload_dtype, device=self.batch.device)

    def encode(self, wire, xs, residuals, residuals_out, scale: float, velocity=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress every tensor into ``wire``; ``(sum ||v||^2, sum ||v - C(v)||^2)`` (0-d tensors)."""
        seeds = [self.batch.seed_of(t, 0) for t in range(len(xs))]
        return self.batch.compressor.encode_batch(
            xs, residuals, residuals_out, wire, self.layout.offsets, seeds=seeds, scale=scale, velocity=velocity
        )

    def set_flag(self, wire: torch.Tensor, finite: torch.Tensor) -> None:
        """Write this rank's flag from ``finite`` (a 0-d bool tensor; no host sync)."""
        if wire.dtype == torch.uint8:
            wire[self.layout.flag] = torch.logical_not(finite).to(torch.uint8)
        else:  # a summable wire: NaN in the trailing element poisons the sum on every rank
            wire[self.layout.flag] = torch.where(finite, 0.0, float("nan")).to(wire.dtype)

    def launch(self, wire: torch.Tensor) -> torch.futures.Future:
        """Issue the (first) collective (hook thread)."""
        raise NotImplementedError

    def finish(self) -> bool:
        """Decode into ``batch.outs`` after the last collective; False: some rank's data was not finite."""
        raise NotImplementedError

    def commit(self, state, names: Sequence[str]) -> None:
        """After a successful exchange, keep what this transport carries between steps (``names``: the
        tensors' parameter names); nothing by default."""

    def _decode_seeds(self) -> list[int]:
        return [self.batch.seed_of(t, 0) for t in range(len(self.batch.numels))]


class AllReduceTransport(Transport):
    """Summable payloads: one allreduce of the wire; a trailing element carries the inf/NaN flag."""

    def launch(self, wire):
        self.wire = wire
        return self.comm.allreduce_async(wire)

    def finish(self) -> bool:
        if not bool(torch.isfinite(self.wire[self.layout.flag])):
            return False
        self.batch.compressor.decode_batch([self.wire], self.layout.offsets, self.batch.outs, self._decode_seeds())
        return True


class AllGatherTransport(Transport):
    """Any payload: all_gather the wire; every rank decodes and sums every rank's payloads."""

    def launch(self, wire):
        self.gathered, fut = self.comm.all_gather_async(wire)
        return fut

    def finish(self) -> bool:
        if bool(self.gathered[:, self.layout.flag].any()):
            return False
        wires = list(self.gathered.unbind(0))
        self.batch.compressor.decode_batch(wires, self.layout.offsets, self.batch.outs, self._decode_seeds())
        return True


class TwoPassTransport(Transport):
    """Sharded aggregation: rank r sums shard r of every tensor, then all ranks gather the sums.

    Pass 1 (all_to_all): each tensor is cut into ``world`` shards (:func:`shard_bounds`), each
    compressed on its own; row ``j`` of the wire (one row per destination rank) holds shard
    ``j`` of every tensor, and rank ``r`` receives every rank's shard ``r``. Pass 2
    (all_gather): with a server error (``ef`` and ``doublesqueeze``: DoubleSqueeze's server
    step), rank ``r`` sums the decoded shards, adds its server error, compresses that and keeps
    the new server error; without one the shard sum travels in fp32. Each rank sends about
    ``2(n-1)/n`` payloads per step, against ``n-1`` for all_gather. Every row and every pass
    carries its sender's flag.
    """

    passes = 2

    def __init__(
        self,
        comm,
        batch,
        *,
        server_memory: list[torch.Tensor] | None,
        server_out: list[torch.Tensor] | None = None,
        server_seed: Callable[[int, int], int],
    ):
        super().__init__(comm, batch)
        n, comp = comm.world_size, batch.compressor
        self.server_memory = server_memory  # this rank's server error per tensor (DoubleSqueeze), or None
        # where the new server errors go (buffers reused between steps), one per tensor
        self.server_out = server_out or [torch.empty(m.numel(), device=batch.device) for m in server_memory or ()]
        self.server_seed = server_seed  # (tensor, shard) -> seed of the server compression, the same on every rank
        self.bounds = [[shard_bounds(m, n, j) for j in range(n)] for m in batch.numels]
        # Pass 1 rows: shard j of every tensor, laid out the same way in every row (padded to the longest).
        rows = [wire_layout([comp.payload_nbytes(b[j][1] - b[j][0]) for b in self.bounds]) for j in range(n)]
        self.row_offsets = [offsets for offsets, _ in rows]
        self.row_flag = max(end for _, end in rows)
        self.row_bytes = self.row_flag + WIRE_ALIGN
        # Pass 2: this rank's shard of every tensor, compressed (DoubleSqueeze) or fp32; the longest row.
        longest = [max(b[j][1] - b[j][0] for j in range(n)) for b in self.bounds]
        row2 = [comp.payload_nbytes(m) if server_memory is not None else 4 * m for m in longest]
        self.second_offsets, end = wire_layout(row2)
        self.second_flag, self.second_bytes = end, end + WIRE_ALIGN
        self.new_server: list[torch.Tensor] = []

    def new_wire(self) -> torch.Tensor:
        return torch.zeros(self.comm.world_size, self.row_bytes, dtype=torch.uint8, device=self.batch.device)

    def encode(self, wire, xs, residuals, residuals_out, scale, velocity=None):
        n, T = self.comm.world_size, len(xs)

        def cut(ts):
            return [None if t is None else t[b[j][0] : b[j][1]] for j in range(n) for t, b in zip(ts, self.bounds)]

        offsets = [j * self.row_bytes + self.row_offsets[j][t] for j in range(n) for t in range(T)]
        seeds = [self.batch.seed_of(t, j) for j in range(n) for t in range(T)]
        if velocity is not None:  # shard the velocity's tensors alike
            velocity = velocity._replace(p=cut(velocity.p), u_old=cut(velocity.u_old), u_out=cut(velocity.u_out))
        return self.batch.compressor.encode_batch(
            cut(xs), cut(residuals), cut(residuals_out), wire.view(-1), offsets, seeds=seeds, scale=scale,
            velocity=velocity,
        )  # fmt: skip

    def set_flag(self, wire, finite) -> None:
        wire[:, self.row_flag] = torch.logical_not(finite).to(torch.uint8)

    def launch(self, wire):
        self.received, fut = self.comm.all_to_all_async(wire)
        return fut

    def first_ok(self) -> bool:
        """Every rank's pass-1 data was finite (read after pass 1 completed)."""
        return not bool(self.received[:, self.row_flag].any())

    def launch_second(self) -> torch.futures.Future:
        """Server step on this rank's shards and the all_gather of the results (hook thread)."""
        comp, r, device = self.batch.compressor, self.comm.rank, self.batch.device
        rows = list(self.received.unbind(0))
        wire = torch.zeros(self.second_bytes, dtype=torch.uint8, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for i, (b, off) in enumerate(zip(self.bounds, self.second_offsets)):
            lo, hi = b[r]
            m = hi - lo
            parts = [comp.payload_in(row, self.row_offsets[r][i], m) for row in rows]
            seeds = [self.batch.seed_of(i, r)] * len(parts)
            if self.server_memory is not None:
                err_out = self.server_out[i]
                q = comp.server_compress(parts, seeds, self.server_memory[i], err_out, self.server_seed(i, r))
                self.new_server.append(err_out)
                payload = q.payload.reshape(-1).view(torch.uint8)
                finite &= torch.isfinite(q.norm_sq)
            else:
                total = wire[off : off + 4 * m].view(torch.float32)
                comp.decode_add_many_(parts, total.zero_(), seeds)
                payload = None
                finite &= torch.isfinite(total).all()
            if payload is not None:
                wire[off : off + payload.numel()].copy_(payload)
        wire[self.second_flag] = torch.logical_not(finite).to(torch.uint8)
        self.gathered, fut = self.comm.all_gather_async(wire)
        return fut

    def commit(self, state, names: Sequence[str]) -> None:
        """The new server errors (DoubleSqueeze) become this rank's server memory."""
        for name, error in zip(names, self.new_server):
            state.commit_buffer(state.server_memory, name, "server_error", error)

    def finish(self) -> bool:
        if bool(self.gathered[:, self.second_flag].any()):
            return False
        comp = self.batch.compressor
        for j, row in enumerate(self.gathered.unbind(0)):
            # Rank j's row holds shard j of every tensor: one batched decode writes them in place.
            shards = [(i, off, out[b[j][0] : b[j][1]])
                      for i, (b, off, out) in enumerate(zip(self.bounds, self.second_offsets, self.batch.outs))
                      if b[j][1] > b[j][0]]  # fmt: skip
            if self.server_memory is not None:
                comp.decode_batch([row], [off for _, off, _ in shards], [piece for _, _, piece in shards],
                                  [self.server_seed(i, j) for i, _, _ in shards])  # fmt: skip
            else:
                for _, off, piece in shards:
                    piece.copy_(row[off : off + 4 * piece.numel()].view(torch.float32))
        return True


TRANSPORTS: dict[str, type[Transport]] = {
    "allreduce": AllReduceTransport,
    "allgather": AllGatherTransport,
    "two_pass": TwoPassTransport,
}


def send_encoded(
    kind: str,
    comm: Collectives,
    compressor: Compressor,
    payloads: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    seeds: Sequence[int],
    local_finite: bool,
) -> bool:
    """Exchange payloads encoded elsewhere (``allreduce`` or ``allgather``) and wait; False: not finite.

    ``outs[t]`` receives the sum over ranks of tensor ``t``'s decoded payloads.
    """
    if kind not in ("allreduce", "allgather"):
        raise ValueError(f"already encoded payloads travel by allreduce or allgather, not {kind!r}")
    device = outs[0].device
    batch = Batch(compressor, [o.numel() for o in outs], list(outs), lambda t, _: seeds[t], device)
    transport = TRANSPORTS[kind](comm, batch)
    wire = transport.new_wire()
    for payload, offset in zip(payloads, transport.layout.offsets):
        flat = payload.reshape(-1)
        wire[offset : offset + flat.numel()].copy_(flat)
    transport.set_flag(wire, torch.tensor(local_finite, device=device))
    transport.launch(wire).wait()
    return transport.finish()
