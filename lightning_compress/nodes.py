"""The node layout of the hierarchical exchange: which ranks share a node, and their process groups.

With ``CompressionConfig(hierarchical=True)`` the ``W`` ranks are ``N`` nodes of ``L`` ranks each,
numbered node by node as torchrun numbers them (see :func:`resolve_layout`). :func:`make_hierarchy`
creates the two groups every rank belongs to (its node, and the ranks of its local index on the other
nodes) once, when the state is built; :mod:`lightning_compress.hierarchy` runs the exchange over them.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

from lightning_compress.collectives import Collectives
from lightning_compress.transport import shard_bounds, shard_size

if TYPE_CHECKING:
    from lightning_compress.config import CompressionConfig

__all__ = ["Hierarchy", "NodeLayout", "expected_sent", "make_hierarchy", "node_layout", "resolve_layout"]


class NodeLayout(NamedTuple):
    """``nodes`` nodes of ``ranks_per_node`` ranks, numbered node by node."""

    ranks_per_node: int
    nodes: int


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip())
    except ValueError:
        return default


def resolve_layout(config: CompressionConfig, state: Any) -> NodeLayout | None:
    """The node layout ``config`` asks for on ``state``'s ranks; ``None``: the flat exchange runs.

    ``ranks_per_node`` is the config's, or ``LOCAL_WORLD_SIZE`` (torchrun sets it) when that is 0.
    The ranks first compare their settings (:func:`~lightning_compress.agreement.check_agreement`),
    then every rank's value (and its ``LOCAL_RANK``) goes to every rank in one small all_gather of
    the settings check's group, so that all ranks raise alike instead of creating different process
    groups. Collectives of the exchange's group when ``hierarchical`` is on.

    One node (``ranks_per_node == W``) or one rank per node leaves nothing to do on one side of the
    hierarchy: rank 0 warns in one line and the flat exchange runs.

    Raises:
        ValueError: no ``ranks_per_node`` and no ``LOCAL_WORLD_SIZE``; it does not divide the world
            size; ranks are not numbered node by node (``LOCAL_RANK != rank % ranks_per_node``); or a
            process group other than the default one.
        RuntimeError: the ranks see different ``ranks_per_node``.
    """
    world, rank = state.world_size, state.rank
    if not config.hierarchical or world <= 1:
        return None
    # First the ranks' settings check (the same collective the flat ranks' registration runs next): ranks
    # that disagree on `hierarchical` itself all stop there with its message, before anything else differs.
    from lightning_compress.agreement import check_agreement

    check_agreement(state, "at registration")
    if state.process_group is not None and state.process_group is not dist.group.WORLD:
        raise ValueError(
            "`hierarchical=True` runs on the default process group (the nodes are found from the global ranks); "
            "got a process group of its own. Pass process_group=None, or use `hierarchical=False`."
        )
    source = "ranks_per_node" if config.ranks_per_node else "LOCAL_WORLD_SIZE"
    mine = config.ranks_per_node or _env_int("LOCAL_WORLD_SIZE", 0)
    views = _gather_ints(state, [mine, _env_int("LOCAL_RANK", -1)])
    sizes = {v[0] for v in views}
    if len(sizes) > 1:
        seen = "; ".join(f"rank {r}: {v[0]}" for r, v in enumerate(views))
        raise RuntimeError(
            f"lightning_compress: the ranks see different numbers of ranks per node ({source}): {seen}. "
            "hierarchical=True needs nodes of equal size; set `ranks_per_node` explicitly."
        )
    per_node = views[0][0]
    if per_node <= 0:
        raise ValueError(
            "`hierarchical=True` needs the number of ranks per node: set `ranks_per_node` (> 0), or launch with "
            "torchrun, which sets LOCAL_WORLD_SIZE (unset or not a number here)"
        )
    if world % per_node:
        raise ValueError(
            f"`ranks_per_node={per_node}` (from {source}) does not divide the world size {world}: "
            "hierarchical=True needs nodes of equal size"
        )
    misplaced = [(r, v[1]) for r, v in enumerate(views) if v[1] >= 0 and v[1] != r % per_node]
    if misplaced:
        shown = ", ".join(f"rank {r} has LOCAL_RANK {lr}" for r, lr in misplaced[:4])
        raise ValueError(
            f"hierarchical=True takes rank r to be local rank r % {per_node} of node r // {per_node} (torchrun's "
            f"numbering); here {shown}. Launch with torchrun, or use `hierarchical=False`."
        )
    if per_node in (1, world):
        if rank == 0:
            why = ("all ranks are on one node: nothing crosses nodes" if per_node == world
                   else "one rank per node: nothing to sum inside a node")  # fmt: skip
            warnings.warn(
                f"lightning_compress: hierarchical=True with ranks_per_node={per_node} on {world} ranks: {why}; "
                "the flat exchange runs",
                UserWarning,
                stacklevel=4,
            )
        return None
    return NodeLayout(per_node, world // per_node)


def _gather_ints(state: Any, values: list[int]) -> list[list[int]]:
    """Every rank's ``values`` (small ints), over the settings check's gloo group."""
    from lightning_compress.agreement import _all_gather_single, _check_group

    group, _ = _check_group(state)
    mine = torch.tensor(values, dtype=torch.int64)
    out = torch.empty(state.world_size, len(values), dtype=torch.int64)
    _all_gather_single(out.view(-1), mine, group=group)
    return out.tolist()


# id(default group), ranks per node -> weak references to (that group, this rank's node group, its cross-node group)
_GROUPS: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, weakref.ref]] = {}


def _node_groups(layout: NodeLayout, world: int, rank: int) -> tuple[Any, Any]:
    """``(node group, cross-node group)`` of ``rank``: its node's ranks, and the ranks of its local index.

    Every rank creates every group (node ``n``'s, then local index ``j``'s), in the same order:
    ``dist.new_group`` is a collective of the default group. Made once per default group and layout,
    reused by later registrations.
    """
    from lightning_compress.agreement import _alive, _timeout

    main = dist.group.WORLD
    key = (id(main), layout.ranks_per_node)
    entry = _GROUPS.get(key)
    if entry is not None and entry[0]() is main:
        intra, inter = entry[1](), entry[2]()
        if intra is not None and inter is not None and _alive(intra) and _alive(inter):
            return intra, inter
    timeout = _timeout(main)
    per, nodes = layout
    # new_group hands the ranks outside a group a placeholder: keep this rank's own.
    intra = [dist.new_group(list(range(n * per, (n + 1) * per)), timeout=timeout) for n in range(nodes)][rank // per]
    inter = [dist.new_group(list(range(j, world, per)), timeout=timeout) for j in range(per)][rank % per]
    _GROUPS[key] = (weakref.ref(main), weakref.ref(intra), weakref.ref(inter))
    return intra, inter


class Hierarchy:
    """One rank's place in the node layout, and the collectives of its two groups.

    ``intra`` reaches the ranks of this node (group rank: the local rank), ``inter`` the ranks of
    the same local index on every node (group rank: the node). Their counters are added to the
    state's at the end of each step (:meth:`take_counts`); only ``inter`` crosses nodes.
    """

    def __init__(self, layout: NodeLayout, rank: int, intra_group: Any, inter_group: Any):
        self.layout = layout
        per, nodes = layout
        self.local, self.node = rank % per, rank // per
        self.intra = Collectives(intra_group, per, self.local)
        self.inter = Collectives(inter_group, nodes, self.node)

    def __repr__(self) -> str:
        return f"Hierarchy({self.layout.nodes} nodes x {self.layout.ranks_per_node} ranks; node {self.node}, local {self.local})"

    def shard(self, numel: int) -> tuple[int, int]:
        """``[lo, hi)`` of the shard of a ``numel``-element tensor this rank sends across nodes."""
        return shard_bounds(numel, self.layout.ranks_per_node, self.local)

    def memory_numel(self, numel: int) -> int:
        """Values of this rank's error memory for a ``numel``-element tensor (its shard's)."""
        lo, hi = self.shard(numel)
        return hi - lo

    def server_numel(self, numel: int) -> int:
        """Values of this rank's server error (two passes across nodes) for a ``numel``-element tensor."""
        lo, hi = shard_bounds(self.memory_numel(numel), self.layout.nodes, self.node)
        return hi - lo

    def describe(self, config: CompressionConfig) -> dict[str, Any]:
        """What the ranks must agree on: the layout and the transport across nodes."""
        return {"ranks_per_node": self.layout.ranks_per_node, "nodes": self.layout.nodes,
                "across_nodes": config.transport_for(self.layout.nodes)}  # fmt: skip

    def take_counts(self) -> tuple[int, float, float]:
        """``(bytes handed, bytes sent, bytes sent across nodes)`` since the last call; resets the counters."""
        handed = self.intra.bytes_handed + self.inter.bytes_handed
        sent = self.intra.bytes_sent + self.inter.bytes_sent
        across = self.inter.bytes_sent
        for comm in (self.intra, self.inter):
            comm.bytes_handed, comm.bytes_sent = 0, 0.0
        return handed, sent, across


def make_hierarchy(config: CompressionConfig, state: Any) -> Hierarchy | None:
    """The hierarchy of ``state``'s ranks for ``config`` (``None``: the flat exchange), its groups created.

    Called once, at state construction (every rank at the same point: :func:`register_compression`).
    """
    layout = resolve_layout(config, state)
    if layout is None:
        return None
    intra, inter = _node_groups(layout, state.world_size, state.rank)
    return Hierarchy(layout, state.rank, intra, inter)


def node_layout(config: CompressionConfig, world_size: int) -> NodeLayout | None:
    """The layout :func:`resolve_layout` finds on this rank, without asking the others (for estimates)."""
    per = config.ranks_per_node or _env_int("LOCAL_WORLD_SIZE", 0)
    if not config.hierarchical or per <= 1 or per >= world_size or world_size % per:
        return None
    return NodeLayout(per, world_size // per)


def expected_sent(config: CompressionConfig, compressor: Any, numel: int, layout: NodeLayout) -> tuple[float, float]:
    """``(bytes one rank sends, of which across nodes)`` for one compressed tensor (as :class:`Collectives` counts)."""
    from lightning_compress.report import _sent

    per, nodes = layout
    longest = shard_size(numel, per)
    inside = 2.0 * 4 * longest * (per - 1)  # the all_to_all (L rows, (L-1)/L of them sent) and the all_gather
    server = config.feedback in ("ef", "doublesqueeze")
    across = _sent(compressor, config.transport_for(nodes), longest, nodes, server)
    return inside + across, across
