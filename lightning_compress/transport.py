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
from lightning_compress.compressors.base import bytes_as

__all__ = ["Collectives", "Exchange", "exchange", "TRANSPORT_NAMES"]

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
class Exchange:
    """What one compressed exchange of several tensors produced on this rank."""

    finite: bool  # False: some rank held inf/NaN; nothing else is set
    aggregates: list[torch.Tensor] = field(default_factory=list)  # sum over ranks of decoded payloads
    decoded: list[torch.Tensor] = field(default_factory=list)  # this rank's own decoded payloads
    server_memory: list[torch.Tensor] = field(default_factory=list)  # new server errors (two-pass)


def _flag(local_finite: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor([0 if local_finite else 1], dtype=torch.uint8, device=device)


def _encode_all(
    compressor: Compressor, vs: Sequence[torch.Tensor], seeds: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    payloads = [compressor.encode(v, seed) for v, seed in zip(vs, seeds)]
    decoded = [compressor.decode(p, v.numel(), seed) for p, v, seed in zip(payloads, vs, seeds)]
    return payloads, decoded


def _split_sizes(buffer: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(buffer, list(sizes)))


def exchange_allreduce(comm, compressor, vs, seeds, local_finite, **_) -> Exchange:
    """Sum summable payloads with one allreduce; a trailing element carries the inf/NaN flag."""
    payloads, decoded = _encode_all(compressor, vs, seeds)
    sentinel = torch.full((1,), 0.0 if local_finite else float("nan"), dtype=compressor.payload_dtype)
    flat = comm.allreduce_(torch.cat([*payloads, sentinel.to(vs[0].device)]))
    if not torch.isfinite(flat[-1]).item():
        return Exchange(finite=False)
    sums = _split_sizes(flat[:-1], [p.numel() for p in payloads])
    aggregates = [compressor.decode(s, v.numel(), seed) for s, v, seed in zip(sums, vs, seeds)]
    return Exchange(True, aggregates, decoded)


def exchange_allgather(comm, compressor, vs, seeds, local_finite, **_) -> Exchange:
    """All-gather one packed buffer per rank; every rank decodes and sums all of them."""
    payloads, decoded = _encode_all(compressor, vs, seeds)
    wire = torch.cat([*(p.view(torch.uint8) for p in payloads), _flag(local_finite, vs[0].device)])
    gathered = comm.all_gather(wire)
    if any(int(w[-1]) for w in gathered):
        return Exchange(finite=False)
    sizes = [p.numel() * p.element_size() for p in payloads]
    aggregates = [torch.zeros_like(v) for v in vs]
    for wire_j in gathered:
        for agg, part, seed in zip(aggregates, _split_sizes(wire_j[:-1], sizes), seeds):
            compressor.decode_add_(bytes_as(part, compressor.payload_dtype), agg, seed)
    return Exchange(True, aggregates, decoded)


def shard_size(numel: int, world_size: int) -> int:
    """Elements per shard when a tensor of ``numel`` is cut into ``world_size`` equal shards."""
    return -(-numel // world_size)


def exchange_two_pass(
    comm: Collectives,
    compressor: Compressor,
    vs: Sequence[torch.Tensor],
    seeds: Sequence[int],
    local_finite: bool,
    *,
    server_memory: Sequence[torch.Tensor] | None,
    shard_seed: Callable[[int, int], int],
    server_seed: Callable[[int, int], int],
) -> Exchange:
    """Sharded aggregation: rank r aggregates shard r of every tensor, then all ranks gather.

    Pass 1 (all_to_all): each tensor is cut into ``world`` equal shards, each compressed on its
    own; rank r receives every rank's shard r and sums the decoded shards. Pass 2 (all_gather):
    with ``server_memory`` (DoubleSqueeze), rank r compresses ``sum + server_error`` and keeps the
    new server error; without it the shard sum travels dense in fp32.

    ``shard_seed(i, j)`` seeds shard ``j`` of tensor ``i`` on this rank; ``server_seed(i, r)``
    seeds the server compression of shard ``r`` (the same on every rank, so all can decode it).
    """
    n, rank, device = comm.world_size, comm.rank, vs[0].device
    sizes = [shard_size(v.numel(), n) for v in vs]
    shards = [torch.nn.functional.pad(v, (0, s * n - v.numel())).view(n, s) for v, s in zip(vs, sizes)]
    payloads = [[compressor.encode(sh[j], shard_seed(i, j)) for j in range(n)] for i, sh in enumerate(shards)]
    decoded = [
        torch.cat([compressor.decode(p, s, shard_seed(i, j)) for j, p in enumerate(ps)])[: v.numel()]
        for i, (ps, s, v) in enumerate(zip(payloads, sizes, vs))
    ]
    flag = _flag(local_finite, device)
    chunks = [torch.cat([*(ps[j].view(torch.uint8) for ps in payloads), flag]) for j in range(n)]
    received = comm.all_to_all(chunks)
    if any(int(c[-1]) for c in received):
        return Exchange(finite=False)

    part_sizes = [ps[0].numel() * ps[0].element_size() for ps in payloads]
    shard_sums = [torch.zeros(s, dtype=torch.float32, device=device) for s in sizes]
    for chunk in received:
        for i, part in enumerate(_split_sizes(chunk[:-1], part_sizes)):
            # Only shared-randomness compressors read the seed in decode, and theirs is rank independent.
            compressor.decode_add_(bytes_as(part, compressor.payload_dtype), shard_sums[i], shard_seed(i, rank))
    new_server: list[torch.Tensor] = []
    if server_memory is not None:
        outgoing = []
        for i, (total, err) in enumerate(zip(shard_sums, server_memory)):
            w = total + err
            q = compressor.encode(w, server_seed(i, rank))
            new_server.append(w - compressor.decode(q, w.numel(), server_seed(i, rank)))
            outgoing.append(q.view(torch.uint8))
    else:
        outgoing = [total.view(torch.uint8) for total in shard_sums]
    gathered = comm.all_gather(torch.cat(outgoing))
    out_sizes = [o.numel() for o in outgoing]
    aggregates = []
    for i, (v, s) in enumerate(zip(vs, sizes)):
        pieces = []
        for j, wire_j in enumerate(gathered):
            part = _split_sizes(wire_j, out_sizes)[i]
            if server_memory is not None:
                pieces.append(compressor.decode(bytes_as(part, compressor.payload_dtype), s, server_seed(i, j)))
            else:
                pieces.append(bytes_as(part, torch.float32))
        aggregates.append(torch.cat(pieces)[: v.numel()])
    return Exchange(True, aggregates, decoded, new_server)


_EXCHANGES = {"allreduce": exchange_allreduce, "allgather": exchange_allgather, "two_pass": exchange_two_pass}


def exchange(kind: str, comm: Collectives, compressor: Compressor, vs, seeds, local_finite: bool, **kwargs) -> Exchange:
    """Run the transport called ``kind`` over the tensors ``vs`` (flat fp32, one per parameter)."""
    return _EXCHANGES[kind](comm, compressor, vs, seeds, local_finite, **kwargs)
