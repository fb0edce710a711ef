"""How payloads travel: allreduce, all_gather, and two-pass (all_to_all + all_gather).

Every function here issues the same collectives, in the same order and with the same
sizes, on every rank: sizes depend only on tensor sizes and the config, and the one
data-dependent decision (some rank holds inf/NaN) is made from a flag that travels
inside the payload, so every rank sees every flag before it decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from lightning_compress.compressors import Compressor
from lightning_compress.compressors.base import Encoded, bytes_as

__all__ = ["Collectives", "Exchange", "Source", "exchange", "TRANSPORT_NAMES"]

TRANSPORT_NAMES = ("allreduce", "allgather", "two_pass")

# Newer PyTorch renames all_gather_into_tensor (and deprecates the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Collectives:
    """The collectives of one process group, counting the bytes handed to them.

    ``bytes_handed`` counts the input tensors given to collectives; ``bytes_sent`` estimates
    what this rank transmits: ``2(n-1)/n`` of an allreduce input (ring), ``(n-1)`` times an
    all_gather input, ``(n-1)/n`` of an all_to_all input. With one process nothing is sent.
    """

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, rank: int):
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.bytes_handed = 0
        self.bytes_sent = 0.0

    def _count(self, tensor: torch.Tensor, factor: float) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_handed += nbytes
        self.bytes_sent += nbytes * factor

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place."""
        n = self.world_size
        self._count(tensor, 2.0 * (n - 1) / n)
        if n > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order."""
        n = self.world_size
        self._count(tensor, float(n - 1))
        if n == 1:
            return [tensor]
        out = torch.empty(n * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, tensor, group=self.group)
        return list(out.view(n, -1).unbind(0))

    def all_to_all(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``chunks[j]`` to rank ``j``; returns what each rank sent here, in rank order."""
        n = self.world_size
        send = torch.cat(list(chunks))
        self._count(send, (n - 1) / n)
        if n == 1:
            return [send]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return list(recv.view(n, -1).unbind(0))


@dataclass
class Source:
    """One tensor to exchange: this rank encodes ``x + residual`` (``residual`` may be ``None``).

    If ``error_out`` is given, the exchange writes ``v - C(v)`` (this rank's compression
    error) into it; it must not be memory that survives a failed exchange.
    """

    x: torch.Tensor
    residual: torch.Tensor | None = None
    error_out: torch.Tensor | None = None
    encoded: Encoded | None = None  # already compressed (allreduce/allgather use it as is)
    aggregate_out: torch.Tensor | None = None  # a buffer for the aggregate (allgather), reused between steps

    def numel(self) -> int:
        return self.x.numel()

    def value(self) -> torch.Tensor:
        """``v = x + residual``, materialized."""
        return self.x if self.residual is None else self.x + self.residual


@dataclass
class Exchange:
    """What one compressed exchange of several tensors produced on this rank."""

    finite: bool  # False: some rank held inf/NaN; nothing else is set
    aggregates: list[torch.Tensor] = field(default_factory=list)  # sum over ranks of decoded payloads
    server_memory: list[torch.Tensor] = field(default_factory=list)  # new server errors (two-pass)
    norm_sq: float = 0.0  # sum over tensors of ||v||^2 on this rank
    err_sq: float = 0.0  # sum over tensors of ||v - C(v)||^2 on this rank


def _flag(local_finite: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor([0 if local_finite else 1], dtype=torch.uint8, device=device)


def _compress_all(compressor: Compressor, sources: Sequence[Source], seeds: Sequence[int]) -> list[Encoded]:
    return [
        s.encoded if s.encoded is not None else compressor.compress(s.x, s.residual, seed=seed, residual_out=s.error_out)
        for s, seed in zip(sources, seeds)
    ]


def _totals(encoded: Sequence[Encoded]) -> dict[str, float]:
    if not encoded:
        return {"norm_sq": 0.0, "err_sq": 0.0}
    both = torch.stack([torch.stack([e.norm_sq, e.err_sq]) for e in encoded]).to(torch.float64).sum(0)
    return {"norm_sq": float(both[0]), "err_sq": float(both[1])}


def _split_sizes(buffer: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(buffer, list(sizes)))


def exchange_allreduce(comm, compressor, sources, seeds, local_finite, **_) -> Exchange:
    """Sum summable payloads with one allreduce; a trailing element carries the inf/NaN flag."""
    encoded = _compress_all(compressor, sources, seeds)
    payloads = [e.payload for e in encoded]
    device = sources[0].x.device
    sentinel = torch.full((1,), 0.0 if local_finite else float("nan"), dtype=compressor.payload_dtype, device=device)
    flat = comm.allreduce_(torch.cat([*payloads, sentinel]))
    if not torch.isfinite(flat[-1]).item():
        return Exchange(finite=False)
    sums = _split_sizes(flat[:-1], [p.numel() for p in payloads])
    aggregates = [compressor.decode(s, src.numel(), seed) for s, src, seed in zip(sums, sources, seeds)]
    return Exchange(True, aggregates, **_totals(encoded))


def exchange_allgather(comm, compressor, sources, seeds, local_finite, **_) -> Exchange:
    """All-gather one packed buffer per rank; every rank decodes and sums all of them."""
    encoded = _compress_all(compressor, sources, seeds)
    payloads = [e.payload for e in encoded]
    wire = torch.cat([*(p.view(torch.uint8) for p in payloads), _flag(local_finite, sources[0].x.device)])
    gathered = comm.all_gather(wire)
    if any(int(w[-1]) for w in gathered):
        return Exchange(finite=False)
    sizes = [p.numel() * p.element_size() for p in payloads]
    per_rank = [_split_sizes(w[:-1], sizes) for w in gathered]
    aggregates = []
    for i, (src, seed) in enumerate(zip(sources, seeds)):
        parts = [bytes_as(parts_j[i], compressor.payload_dtype) for parts_j in per_rank]
        agg = src.aggregate_out.zero_() if src.aggregate_out is not None else torch.zeros_like(src.x)
        aggregates.append(compressor.decode_add_many_(parts, agg, [seed] * len(parts)))
    return Exchange(True, aggregates, **_totals(encoded))


def shard_size(numel: int, world_size: int) -> int:
    """Elements per shard when a tensor of ``numel`` is cut into ``world_size`` equal shards."""
    return -(-numel // world_size)


def exchange_two_pass(
    comm: Collectives,
    compressor: Compressor,
    sources: Sequence[Source],
    seeds: Sequence[int],
    local_finite: bool,
    *,
    server_memory: Sequence[torch.Tensor] | None,
    shard_seed: Callable[[int, int], int],
    server_seed: Callable[[int, int], int],
) -> Exchange:
    """Sharded aggregation: rank r aggregates shard r of every tensor, then all ranks gather.

    Pass 1 (all_to_all): each tensor is cut into ``world`` equal shards (the last one padded
    with zeros), each compressed on its own; rank r receives every rank's shard r. Pass 2
    (all_gather): with ``server_memory`` (DoubleSqueeze), rank r sums the decoded shards, adds
    its server error, compresses that and keeps the new server error (one fused step, see
    :meth:`Compressor.server_compress`); without it the shard sum travels dense in fp32.

    ``shard_seed(i, j)`` seeds shard ``j`` of tensor ``i`` on this rank; ``server_seed(i, r)``
    seeds the server compression of shard ``r`` (the same on every rank, so all can decode it).
    """
    n, rank, device = comm.world_size, comm.rank, sources[0].x.device
    sizes = [shard_size(s.numel(), n) for s in sources]
    payloads, encoded = [], []
    for i, (src, s) in enumerate(zip(sources, sizes)):
        shards = torch.nn.functional.pad(src.value(), (0, s * n - src.numel())).view(n, s)
        errors = None if src.error_out is None else torch.empty(n, s, device=device)
        row = [
            compressor.compress(shards[j], seed=shard_seed(i, j), residual_out=None if errors is None else errors[j])
            for j in range(n)
        ]
        if errors is not None:
            src.error_out.copy_(errors.view(-1)[: src.numel()])
        payloads.append([e.payload for e in row])
        encoded.extend(row)
    flag = _flag(local_finite, device)
    chunks = [torch.cat([*(ps[j].view(torch.uint8) for ps in payloads), flag]) for j in range(n)]
    received = comm.all_to_all(chunks)
    if any(int(c[-1]) for c in received):
        return Exchange(finite=False)

    part_sizes = [ps[0].numel() * ps[0].element_size() for ps in payloads]
    per_rank = [_split_sizes(c[:-1], part_sizes) for c in received]
    new_server: list[torch.Tensor] = []
    outgoing = []
    for i, s in enumerate(sizes):
        parts = [bytes_as(parts_j[i], compressor.payload_dtype) for parts_j in per_rank]
        # Only shared-randomness compressors read the seed in decode, and theirs is rank independent.
        seeds_in = [shard_seed(i, rank)] * n
        if server_memory is not None:
            err_out = torch.empty(s, dtype=torch.float32, device=device)
            q = compressor.server_compress(parts, seeds_in, server_memory[i], err_out, server_seed(i, rank))
            new_server.append(err_out)
            outgoing.append(q.payload.view(torch.uint8))
        else:
            total = compressor.decode_add_many_(parts, torch.zeros(s, dtype=torch.float32, device=device), seeds_in)
            outgoing.append(total.view(torch.uint8))
    gathered = comm.all_gather(torch.cat(outgoing))
    out_sizes = [o.numel() for o in outgoing]
    aggregates = []
    for i, (src, s) in enumerate(zip(sources, sizes)):
        pieces = []
        for j, wire_j in enumerate(gathered):
            part = _split_sizes(wire_j, out_sizes)[i]
            if server_memory is not None:
                pieces.append(compressor.decode(bytes_as(part, compressor.payload_dtype), s, server_seed(i, j)))
            else:
                pieces.append(bytes_as(part, torch.float32))
        aggregates.append(torch.cat(pieces)[: src.numel()])
    return Exchange(True, aggregates, new_server, **_totals(encoded))


_EXCHANGES = {"allreduce": exchange_allreduce, "allgather": exchange_allgather, "two_pass": exchange_two_pass}


def exchange(kind: str, comm: Collectives, compressor: Compressor, sources, seeds, local_finite: bool, **kwargs) -> Exchange:
    """Run the transport called ``kind`` over ``sources`` (one :class:`Source` per parameter)."""
    return _EXCHANGES[kind](comm, compressor, sources, seeds, local_finite, **kwargs)
