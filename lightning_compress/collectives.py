"""The collectives of one process group, as the transports use them: asynchronous, counted.

Every method is called from the thread that calls the DDP hook (see
:mod:`lightning_compress.transport`), so every rank issues the same collectives in the same
order; what runs in completion callbacks never issues one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Collectives", "ORDERED_SUM_UP_TO", "done_future"]

#: Up to this many ranks :meth:`Collectives.sum_ordered_async` gathers and adds in rank order (bytes
#: per rank N-1 times the tensor); beyond it, an allreduce (2(N-1)/N, flat in N).
ORDERED_SUM_UP_TO = 8

# Newer PyTorch renames all_gather_into_tensor (and deprecates the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def done_future(value) -> torch.futures.Future:
    """A future already holding ``value``."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class Collectives:
    """The collectives of one process group, counting the bytes handed to them.

    ``bytes_handed`` counts the input tensors given to collectives; ``bytes_sent`` estimates
    what this rank transmits: ``2(n-1)/n`` of an allreduce input (ring), ``(n-1)`` times an
    all_gather input, ``(n-1)/n`` of an all_to_all input. With one process nothing is sent.

    The ``*_async`` methods return a future that completes with the collective; the others
    wait for it. Both must be called from the thread that calls the DDP hook.
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

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum ``tensor`` over ranks in place; the future completes when it holds the sum."""
        n = self.world_size
        self._count(tensor, 2.0 * (n - 1) / n)
        if n == 1:
            return done_future(tensor)
        return dist.all_reduce(tensor, group=self.group, async_op=True).get_future()

    def all_gather_async(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.futures.Future]:
        """``(out, future)``: ``out[r]`` receives rank ``r``'s ``tensor`` (an ``(n, len)`` buffer, new unless given)."""
        n = self.world_size
        self._count(tensor, float(n - 1))
        if n == 1:
            return tensor.view(1, -1), done_future(None)
        if out is None:
            out = torch.empty(n, tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        work = _all_gather_single(out.view(-1), tensor, group=self.group, async_op=True)
        return out, work.get_future()

    def all_to_all_async(
        self, send: torch.Tensor, recv: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.futures.Future]:
        """``(recv, future)``: row ``j`` of ``send`` (an ``(n, len)`` buffer) goes to rank ``j``;
        row ``j`` of ``recv`` (new unless given) is what rank ``j`` sent here."""
        n = self.world_size
        self._count(send, (n - 1) / n)
        if n == 1:
            return send, done_future(None)
        if recv is None:
            recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group, async_op=True)
        return recv, work.get_future()

    def sum_ordered_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum ``tensor`` over ranks in place, adding the ranks' values in rank order.

        The bits of each element's sum then depend on the ranks' values only, not on where the
        element lies in ``tensor``: an allreduce of 3 or more ranks adds in an order that follows
        the element's position in the buffer, and DDP packs its buckets differently in a run's
        first step than after it rebuilds them, so a resumed run would differ in the last bits.
        On 2 ranks an allreduce is already exact (``a + b == b + a``); from 3 to
        :data:`ORDERED_SUM_UP_TO` ranks this is an all_gather and ``n - 1`` additions, meant for the
        small tensors that stay dense. Its bytes per rank grow as ``n - 1``, so beyond that many ranks
        it is an allreduce again (bytes flat in ``n``): there a resumed run may differ from an
        uninterrupted one in the last bits of those tensors.
        """
        if self.world_size <= 2 or self.world_size > ORDERED_SUM_UP_TO:
            return self.allreduce_async(tensor)
        gathered, fut = self.all_gather_async(tensor)

        def added(_):
            torch.add(gathered[0], gathered[1], out=tensor)
            for row in gathered[2:]:
                tensor.add_(row)
            return tensor

        return fut.then(added)

    # Blocking forms, for the step-end statistics and the GraVAC path.
    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (waits)."""
        self.allreduce_async(tensor).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order (waits)."""
        out, fut = self.all_gather_async(tensor)
        fut.wait()
        return list(out.unbind(0))
