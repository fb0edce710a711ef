"""``CompressionStats``: what the exchange cost, for the last step and since registration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["CompressionStats"]


@dataclass
class CompressionStats:
    """What the exchange cost, for the last finished step and since registration.

    ``bytes_*`` count what was handed to collectives; ``dense_bytes_*`` what a dense DDP
    allreduce of the same buckets would have been handed; ``sent_bytes_*`` estimate what
    this rank transmitted (see :class:`~lightning_compress.transport.Collectives`).
    ``gain`` is ``1 - ||C(v) - v||^2 / ||v||^2`` over the compressed tensors of the last step.
    """

    steps: int = 0
    bytes_last_step: int = 0
    dense_bytes_last_step: int = 0
    sent_bytes_last_step: float = 0.0
    bytes_total: int = 0
    dense_bytes_total: int = 0
    sent_bytes_total: float = 0.0
    gain: float = 1.0
    compressed_last_step: bool = False
    buckets_last_step: int = 0
    #: seconds of the last step spent compressing and launching on the hook's thread, decoding
    #: in completion callbacks, and blocked waiting for collectives (second passes, the drain)
    encode_seconds_last_step: float = 0.0
    decode_seconds_last_step: float = 0.0
    wait_seconds_last_step: float = 0.0
    #: buckets of the last step that some rank could not send finite, averaged densely instead
    fallback_buckets_last_step: int = 0
    #: since registration (and, after a resume, since the start of training): steps that compressed
    #: something, the sum of their gains, and the seconds counted per step above
    compressed_steps: int = 0
    gain_sum: float = 0.0
    encode_seconds_total: float = 0.0
    decode_seconds_total: float = 0.0
    wait_seconds_total: float = 0.0
    #: what this rank sent through collectives whose ranks may be on other nodes: with ``hierarchical=True``
    #: the cross-node exchange and the sums over all ranks (dense tensors, fallbacks), not the traffic
    #: inside a node; otherwise every collective (on one node, an upper bound)
    sent_bytes_across_nodes_last_step: float = 0.0
    sent_bytes_across_nodes_total: float = 0.0

    world_size: int = 1

    def _dense_sent(self, dense_bytes: int) -> float:
        return dense_bytes * 2.0 * (self.world_size - 1) / self.world_size

    @property
    def ratio(self) -> float:
        """What a dense ring allreduce would send over what this rank sent, in the last step.

        With one process nothing is sent and the ratio is taken over bytes handed to collectives.
        """
        if self.world_size > 1 and self.sent_bytes_last_step:
            return self._dense_sent(self.dense_bytes_last_step) / self.sent_bytes_last_step
        return self.dense_bytes_last_step / self.bytes_last_step if self.bytes_last_step else 1.0

    @property
    def ratio_total(self) -> float:
        """As :attr:`ratio`, over every step since registration."""
        if self.world_size > 1 and self.sent_bytes_total:
            return self._dense_sent(self.dense_bytes_total) / self.sent_bytes_total
        return self.dense_bytes_total / self.bytes_total if self.bytes_total else 1.0

    @property
    def mean_gain(self) -> float:
        """:attr:`gain` averaged over the steps that compressed something (1.0 before the first)."""
        return self.gain_sum / self.compressed_steps if self.compressed_steps else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "ratio_total": self.ratio_total, "mean_gain": self.mean_gain}


_STATS_FIELDS = frozenset(f.name for f in fields(CompressionStats))
