"""The scale study's cost model: which collectives a step issues, and what they and the compression cost.

Pure Python (no torch), so that the tests run it on known inputs. :mod:`scale_study` measures the
inputs on this machine (per-element compression costs, the loopback link) and checks the
predictions against measured steps.

A step is modelled bucket by bucket, as DDP hands the gradients over (reverse parameter order,
a first bucket of 1 MiB, then 25 MiB; a bucket closes once it reaches its cap), and for each bucket
as the library exchanges it:

* ``dense``: DDP's own average, one ring allreduce of the fp32 bucket;
* compressed tensors (2-D or more and at least ``min_numel`` elements) go in one *wire* per bucket:
  ``allreduce`` (summable payloads: ``fp16``, shared-seed ``randk``) sends ``2(N-1)/N`` of it,
  ``allgather`` ``N-1`` times it, ``two_pass`` an all_to_all of ``N`` rows of shard payloads
  (``(N-1)/N`` of the buffer) and an all_gather of the compressed shard sum; the bucket's other
  tensors travel densely beside the wire: by allreduce beside ``allreduce``, and, as the library's
  rank-ordered sum does, by all_gather from 3 to 8 ranks beside ``allgather`` and ``two_pass``;
* ``powersgd``: per bucket an allreduce of every matrix's ``P`` (``n x r``) and one of every ``Q``
  (``m x r``), plus one dense allreduce of what is not compressed;
* ``hierarchical`` (``L`` ranks per node, ``M = N / L`` nodes), as :mod:`lightning_compress.hierarchy`
  does it: an all_to_all of the compressed tensors' fp32 shards inside the node (the bytes of a
  reduce-scatter), the compressed exchange of each rank's ``1/L`` shard across nodes among ``M``
  ranks (one per node: ``L`` such groups at once, sharing the node's link) with the transport given,
  an all_gather of the averaged shards inside the node; the tensors that stay dense are summed over
  all ``N`` ranks as in the flat exchange. One node (``N <= L``): the flat exchange. For ``dense``:
  a hierarchical ring (reduce-scatter, allreduce across nodes, all_gather), which DDP does not do.

Time of a collective (``alpha``: latency per message; ``B``: bandwidth) in the usual ring and
pairwise algorithms: a ring allreduce takes ``2(g-1)`` steps of ``S/g``, an all_gather and a
reduce-scatter ``g-1`` steps of one part, an all_to_all ``g-1`` messages of ``1/g`` of the buffer.
On a cluster of nodes with ``L`` ranks each and **one inter-node link per node**, a ring laid out
node by node crosses each node's link once, so every ring step costs ``alpha_inter + chunk /
B_inter``; an all_to_all sends ``L (g - L) / g`` of a buffer over each node's link; ``L`` cross-node
groups at once put ``L`` chunks on it per step. Inside a node the intra-node link is used. The
step's exchange time is the sum of its collectives' times and of the compression (no overlap
with backward, none between collectives). ``Cluster(latency='log')`` charges the latency only
``2 log2 g`` (allreduce) or ``log2 g`` (the others) times, with the same bytes: the bound of tree,
recursive-doubling and Bruck algorithms, to show how much the ring's latency decides.

On the measurement machine (every rank a process of one host, loopback TCP), every collective costs
``steps * alpha + sent_bytes * s / B``: all ranks' bytes go through the same cores, and so does
the compression, stretched by ``s`` too; ``s`` is how much longer the compute-only step takes when
all ``N`` ranks run it at once than when one runs it alone, measured in the same launch
(``max(1, N / C)`` on an otherwise idle host of ``C`` cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

MiB = 1 << 20
GBIT = 1e9 / 8  # bytes per second of one Gbit/s
WIRE_ALIGN = 8  # the library's payload alignment (and flag slot) in packed wires
ORDERED_SUM_UP_TO = 8  # the library's Collectives.ORDERED_SUM_UP_TO: rank-ordered sums by all_gather up to it
KINDS = ("allreduce", "all_gather", "all_to_all", "reduce_scatter")
Shape = tuple[int, ...]


# ----- links and collectives --------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message (one step of the algorithm)
    bandwidth: float  # bytes per second, one direction


@dataclass(frozen=True)
class Cluster:
    intra: Link
    inter: Link
    ranks_per_node: int = 8
    #: ``ring``: every message of the ring and pairwise algorithms pays ``alpha``; ``log``: an allreduce
    #: pays it ``2 log2 g`` times, the other collectives ``log2 g`` times (trees, recursive doubling,
    #: Bruck), with the same bytes: a latency-optimal bound (the two bracket what libraries achieve)
    latency: str = "ring"


@dataclass(frozen=True)
class Op:
    """One collective: ``nbytes`` is this rank's input (an all_gather: its own part; an
    all_to_all: its whole send buffer). ``scope``: ``flat`` (a group of all ``N`` ranks, node by
    node), ``intra`` (inside one node) or ``cross`` (one rank per node, ``L`` such groups at once)."""

    kind: str
    group: int
    nbytes: float
    scope: str = "flat"


def steps(op: Op) -> int:
    """Messages in sequence: ring allreduce ``2(g-1)``, the others ``g-1``."""
    g = op.group
    return 0 if g <= 1 else (2 * (g - 1) if op.kind == "allreduce" else g - 1)


def chunk(op: Op) -> float:
    """Bytes one rank sends per step."""
    g = op.group
    return op.nbytes if op.kind == "all_gather" else op.nbytes / g


def sent_bytes(op: Op) -> float:
    """Bytes one rank transmits: ``2(g-1)/g``, ``g-1``, ``(g-1)/g``, ``(g-1)/g`` of its input."""
    return steps(op) * chunk(op)


def _spans_nodes(op: Op, n_ranks: int, per_node: int) -> bool:
    return op.scope == "cross" or (op.scope == "flat" and n_ranks > per_node)


def nic_bytes(op: Op, n_ranks: int, per_node: int) -> float:
    """Bytes leaving one node over its inter-node link for ``op``."""
    if op.group <= 1 or not _spans_nodes(op, n_ranks, per_node):
        return 0.0
    g = op.group
    if op.scope == "cross":  # per_node groups at once, every member's sends cross
        return per_node * sent_bytes(op)
    if op.kind == "all_to_all":
        return per_node * (g - per_node) / g * op.nbytes
    return steps(op) * chunk(op)  # a ring laid out node by node: one edge per node crosses


def latency_steps(op: Op, latency: str = "ring") -> int:
    """Messages in sequence that pay the latency: :func:`steps`, or with ``latency='log'`` ``2 log2 g``
    for an allreduce and ``log2 g`` for the others."""
    if latency == "log" and op.group > 1:
        hops = math.ceil(math.log2(op.group))
        return 2 * hops if op.kind == "allreduce" else hops
    return steps(op)


def op_time(op: Op, n_ranks: int, cluster: Cluster) -> float:
    """Seconds of ``op`` on ``cluster``."""
    if op.group <= 1:
        return 0.0
    L = cluster.ranks_per_node
    hops = latency_steps(op, cluster.latency)
    if not _spans_nodes(op, n_ranks, L):
        link = cluster.intra
        return hops * link.alpha + steps(op) * chunk(op) / link.bandwidth
    link = cluster.inter
    if op.kind == "all_to_all":
        intra = (op.group - 1) / op.group * op.nbytes / cluster.intra.bandwidth
        return hops * link.alpha + max(nic_bytes(op, n_ranks, L) / link.bandwidth, intra)
    per_step = chunk(op) * (L if op.scope == "cross" else 1)
    return hops * link.alpha + steps(op) * per_step / link.bandwidth


def loopback_time(op: Op, alpha: float, bandwidth: float, stretch: float = 1.0) -> float:
    """Seconds of ``op`` among processes of one host whose cores they share: its bytes take
    ``stretch`` times as long as one process alone would take (``max(1, N / cores)`` for ``N``
    busy processes on an otherwise idle host; :mod:`scale_study` measures it)."""
    return steps(op) * alpha + sent_bytes(op) * stretch / bandwidth


# ----- architectures ------------------------------------------------------------------------------
def mlp_shapes(widths: Sequence[int]) -> list[Shape]:
    """``nn.Sequential`` of Linear layers through ``widths``: weight ``(out, in)``, bias ``(out,)``."""
    shapes: list[Shape] = []
    for d_in, d_out in zip(widths, widths[1:]):
        shapes += [(d_out, d_in), (d_out,)]
    return shapes


def resnet50_shapes(classes: int = 1000) -> list[Shape]:
    """ResNet-50 (He et al., CVPR 2016; torchvision's layout, v1.5: stride in the 3x3) in
    parameter order: 25,557,032 parameters in 161 tensors (BatchNorm weight and bias included)."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * width
            shapes += [(width, c_in, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, c_in, 1, 1), (out,), (out,)]
            c_in = out
    return shapes + [(classes, 2048), (classes,)]


def bert_base_shapes(vocab: int = 30522, d: int = 768, layers: int = 12, ffn: int = 3072) -> list[Shape]:
    """BERT-base (Devlin et al., NAACL 2019; Hugging Face's ``BertModel`` with the pooler) in
    parameter order: 109,482,240 parameters in 199 tensors."""
    shapes: list[Shape] = [(vocab, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,), (ffn, d), (ffn,), (d, ffn), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def numel(shape: Shape) -> int:
    return math.prod(shape)


def ddp_buckets(shapes: Sequence[Shape], cap: int = 25 * MiB, first_cap: int = 1 * MiB) -> list[list[Shape]]:
    """DDP's buckets of fp32 gradients: reverse parameter order, the first closed at ``first_cap``
    bytes, the others at ``cap`` (a bucket closes once it reaches its cap)."""
    buckets, current, size, limit = [], [], 0, first_cap
    for shape in reversed(shapes):
        current.append(shape)
        size += 4 * numel(shape)
        if size >= limit:
            buckets.append(current)
            current, size, limit = [], 0, cap
    if current:
        buckets.append(current)
    return buckets


# ----- schemes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """What a configuration sends; ``compressor='dense'`` is DDP's own allreduce."""

    compressor: str = "dense"
    transport: str = "allreduce"
    feedback: str = "none"
    density: float = 0.01
    block_size: int = 1024
    rank: int = 4
    min_numel: int = 1024
    hierarchical: bool = False
    ranks_per_node: int = 8
    #: the tensors that stay dense are summed in rank order (an all_gather from 3 ranks on) beside
    #: the allgather and two_pass transports, as the library does; False: by allreduce (a variant)
    ordered_rest: bool = True

    @property
    def key(self) -> str:
        """The compressor as the per-element cost table names it."""
        if self.compressor in ("topk", "randk", "dgc"):
            return f"{self.compressor}_{self.density:g}"
        if self.compressor == "powersgd":
            return f"powersgd_r{self.rank}"
        return self.compressor


SUMMABLE = ("dense", "none", "fp16", "bf16", "randk")


def resolve_transport(compressor: str, feedback: str, transport: str, n_ranks: int) -> str:
    """``transport='auto'`` as :meth:`CompressionConfig.transport_for` resolves it (no GraVAC)."""
    if compressor == "powersgd":
        return "powersgd"
    if transport != "auto":
        return transport
    if feedback == "doublesqueeze":
        return "two_pass"
    if compressor in SUMMABLE:
        return "allreduce"
    if feedback == "ef" and n_ranks >= 4:
        return "two_pass"
    return "allgather"


def scheme_from_config(text: str, n_ranks: int) -> Scheme:
    """The scheme of a ``CompressionConfig`` string (``"dense"``: DDP's allreduce) on ``n_ranks``."""
    if text.strip() == "dense":
        return Scheme()
    values = dict(part.split("=", 1) for part in text.split(",") if part.strip())
    values = {k.strip(): v.strip() for k, v in values.items()}
    comp = values.get("compressor", "sign")
    fb = values.get("feedback", "ef")
    hier = values.get("hierarchical", "false").lower() in ("1", "true", "yes")
    per_node = int(values.get("ranks_per_node", 8))
    # hierarchical on more than one node: the compressed exchange runs among the nodes, and `auto` resolves there
    group = n_ranks // per_node if hier and per_node not in (1, n_ranks) and n_ranks > per_node else n_ranks
    return Scheme(
        compressor=comp,
        transport=resolve_transport(comp, fb, values.get("transport", "auto"), group),
        feedback=fb,
        density=float(values.get("density", 0.01)),
        # the library's default: 1024 elements per scale, 256 with DoubleSqueeze
        block_size=int(values.get("block_size", 256 if fb == "doublesqueeze" else 1024)),
        rank=int(values.get("powersgd_rank", 4)),
        min_numel=int(values.get("min_numel", 1024)),
        hierarchical=hier,
        ranks_per_node=per_node,
    )


def _aligned(nbytes: int) -> int:
    return -(-nbytes // WIRE_ALIGN) * WIRE_ALIGN


def _k(n: int, density: float) -> int:
    return 0 if n == 0 else min(n, max(1, math.ceil(density * n - 1e-9)))


def payload_nbytes(scheme: Scheme, n: int) -> int:
    """Bytes of one tensor's payload (``n`` elements), as the library's compressors size it."""
    c = scheme.compressor
    if c in ("dense", "none"):
        return 4 * n
    if c in ("fp16", "bf16"):
        return 2 * n
    if c == "sign":
        block = max(1, min(scheme.block_size, n))
        return 4 * -(-n // block) + -(-n // 8)
    if c in ("topk", "dgc"):
        return 8 * _k(n, scheme.density)
    if c == "randk":
        return 4 * _k(n, scheme.density)
    raise ValueError(f"no payload size for compressor {c!r}")


def matrix_shape(shape: Shape) -> tuple[int, int]:
    """PowerSGD's view of a parameter: ``d0 x (numel / d0)``."""
    return shape[0], numel(shape) // shape[0]


def low_rank_pays(n: int, m: int, rank: int) -> bool:
    return (n + m) * rank < n * m


def compressible(scheme: Scheme, shape: Shape) -> bool:
    return len(shape) > 1 and numel(shape) >= max(scheme.min_numel, 1)


def _wire_ops(scheme: Scheme, numels: Sequence[int], rest: int, group: int, scope: str) -> list[Op]:
    """The collectives of one bucket's compressed exchange among ``group`` ranks: the wire(s)
    for tensors of ``numels`` elements, and the ``rest`` fp32 elements that stay dense."""
    ops: list[Op] = []
    t = scheme.transport
    if numels:
        if t == "allreduce":  # summable payload elements back to back, one trailing flag element
            item = 2 if scheme.compressor in ("fp16", "bf16") else 4
            ops.append(Op("allreduce", group, sum(payload_nbytes(scheme, n) for n in numels) + item, scope))
        elif t == "allgather":
            wire = sum(_aligned(payload_nbytes(scheme, n)) for n in numels) + WIRE_ALIGN
            ops.append(Op("all_gather", group, wire, scope))
        elif t == "two_pass":
            g = group
            row = max(sum(_aligned(payload_nbytes(scheme, _shard(n, g, j))) for n in numels) for j in range(g))
            ops.append(Op("all_to_all", group, g * (row + WIRE_ALIGN), scope))
            longest = [_shard(n, g, 0) for n in numels]
            server = scheme.feedback in ("ef", "doublesqueeze")
            second = sum(_aligned(payload_nbytes(scheme, m) if server else 4 * m) for m in longest)
            ops.append(Op("all_gather", group, second + WIRE_ALIGN, scope))
        else:
            raise ValueError(f"unknown transport {t!r}")
    if rest:
        # the library's rank-ordered sum (Collectives.sum_ordered_async): an all_gather from 3 to 8 ranks
        ordered = scheme.ordered_rest and t != "allreduce" and 2 < group <= ORDERED_SUM_UP_TO
        ops.append(Op("all_gather" if ordered else "allreduce", group, 4 * rest, scope))
    return ops


def _shard(n: int, g: int, j: int) -> int:
    size = -(-n // g)
    lo = min(j * size, n)
    return min(lo + size, n) - lo


def bucket_ops(scheme: Scheme, bucket: Sequence[Shape], n_ranks: int) -> list[Op]:
    """The collectives one bucket costs one rank under ``scheme`` on ``n_ranks`` ranks."""
    tensors = [(s, compressible(scheme, s)) for s in bucket]
    L = scheme.ranks_per_node
    if not scheme.hierarchical or L in (1, n_ranks) or n_ranks <= L:  # one node: the flat exchange
        return _flat_ops(scheme, tensors, n_ranks, "flat")
    if n_ranks % L:
        raise ValueError(f"hierarchical: {n_ranks} ranks are not whole nodes of {L}")
    nodes = n_ranks // L
    if scheme.compressor == "dense":  # hierarchical ring: reduce-scatter, allreduce across, all_gather
        shard = -(-sum(numel(s) for s in bucket) // L)
        return [Op("reduce_scatter", L, 4 * shard * L, "intra"), Op("allreduce", nodes, 4 * shard, "cross"),
                Op("all_gather", L, 4 * shard, "intra")]  # fmt: skip
    chosen = [s for s, c in tensors if c]
    rest = sum(numel(s) for s, c in tensors if not c)
    ops = []
    if chosen:  # the library: all_to_all of fp32 shards in the node, compressed shards across, all_gather back
        row = sum(-(-numel(s) // L) for s in chosen)
        ops.append(Op("all_to_all", L, 4 * L * row, "intra"))
        ops += _flat_ops(scheme, [(shard_shape(s, L), True) for s in chosen], nodes, "cross")
        ops.append(Op("all_gather", L, 4 * (row + 1), "intra"))
    if rest:  # the tensors that stay dense: summed over all ranks in rank order
        ops += _wire_ops(scheme, [], rest, n_ranks, "flat")
    return ops


def _flat_ops(scheme: Scheme, tensors: Sequence[tuple[Shape, bool]], group: int, scope: str) -> list[Op]:
    """``tensors``: ``(shape, compressed)`` pairs of one bucket (or of this rank's shard of it)."""
    total = sum(numel(s) for s, _ in tensors)
    if scheme.compressor == "dense":
        return [Op("allreduce", group, 4 * total, scope)]
    if scheme.compressor == "powersgd":  # wire 1: every P (and matrices that do not pay, as they are), wire 2: Q
        p = q = rest = 0
        for s, chosen in tensors:
            n, m = matrix_shape(s) if len(s) > 1 else (1, numel(s))
            if not chosen:
                rest += numel(s)
            elif low_rank_pays(n, m, scheme.rank):
                p, q = p + n * scheme.rank, q + m * scheme.rank
            else:
                p += n * m
        ops = []
        if len(tensors) > sum(1 for _, c in tensors if not c):  # a flag element ends each wire
            ops = [Op("allreduce", group, 4 * (p + 1), scope), Op("allreduce", group, 4 * (q + 1), scope)]
        return ops + ([Op("allreduce", group, 4 * rest, scope)] if rest else [])
    chosen = [numel(s) for s, c in tensors if c]
    return _wire_ops(scheme, chosen, total - sum(chosen), group, scope)


def shard_shape(shape: Shape, parts: int) -> Shape:
    """One of ``parts`` row shards of a parameter (its first dimension cut; at least one row)."""
    if len(shape) == 1:
        return (-(-shape[0] // parts),)
    return (-(-shape[0] // parts), numel(shape) // shape[0])


def step_ops(scheme: Scheme, shapes: Sequence[Shape], n_ranks: int) -> list[Op]:
    """Every collective of one step (all buckets)."""
    return [op for b in ddp_buckets(shapes) for op in bucket_ops(scheme, b, n_ranks)]


# ----- compression cost ----------------------------------------------------------------------------
def _enc(c: Mapping[str, float], calls: float, elements: float) -> float:
    return c["encode_call"] * calls + c["encode"] * elements


def _dec(c: Mapping[str, float], calls: float, elements: float, payloads: float) -> float:
    return c["decode_call"] * calls + c["decode_out"] * elements + c["decode"] * elements * payloads


def compression_seconds(scheme: Scheme, shapes: Sequence[Shape], n_ranks: int, costs: Mapping) -> float:
    """Seconds one rank spends compressing and decoding in a step, from per-element costs.

    ``costs[scheme.key]`` holds seconds per element (``encode``; ``decode`` per payload decoded;
    ``decode_out`` per output element, once per decode) and per call (``encode_call``,
    ``decode_call``: one tensor or shard). ``costs['add']`` is one pass over memory (``y += x``),
    which EF21 and DIANA spend twice per element beside the compressor.
    """
    if scheme.compressor == "dense":
        return 0.0
    group, div = n_ranks, 1
    L = scheme.ranks_per_node
    if scheme.hierarchical and L not in (1, n_ranks) and n_ranks > L:
        group, div = n_ranks // L, L
    c = costs[scheme.key]
    total = 0.0
    for bucket in ddp_buckets(shapes):
        chosen = [s for s in bucket if compressible(scheme, s)]
        if div > 1:
            chosen = [shard_shape(s, div) for s in chosen]
        if scheme.compressor == "powersgd":
            for s in chosen:
                n, m = matrix_shape(s)
                if low_rank_pays(n, m, scheme.rank):
                    total += _enc(c, 1, n * m) + _dec(c, 1, n * m, 1)
            continue
        numels = [numel(s) for s in chosen]
        n, T = sum(numels), len(numels)
        if not T:
            continue
        t = scheme.transport
        if t == "allreduce":
            total += _enc(c, T, n) + _dec(c, T, n, 1)
        elif t == "allgather":
            total += _enc(c, T, n) + _dec(c, T, n, group)
        elif t == "two_pass":
            g = group
            # pass 1: every shard encoded; server: g shards decoded and the sum encoded; pass 2: g rows decoded
            total += _enc(c, T * g, n) + _dec(c, T, n / g, g) + _enc(c, T, n / g) + _dec(c, T * g, n, 1)
        if scheme.feedback in ("ef21", "diana"):
            total += 2 * costs["add"] * n
        if div > 1:  # the node's shards added in local rank order, the averaged shards written back
            total += costs["add"] * n * div
    return total


# ----- a step -----------------------------------------------------------------------------------
def exchange(scheme: Scheme, shapes: Sequence[Shape], n_ranks: int, cluster: Cluster, costs: Mapping | None) -> dict:
    """The modelled exchange of one step on ``cluster``: seconds of communication and compression,
    bytes one rank sends, bytes crossing one node's link, collectives."""
    if scheme.hierarchical:
        scheme = replace(scheme, ranks_per_node=cluster.ranks_per_node)
        if n_ranks % cluster.ranks_per_node and n_ranks > cluster.ranks_per_node:
            raise ValueError(f"{n_ranks} ranks are not whole nodes of {cluster.ranks_per_node}")
        if n_ranks < cluster.ranks_per_node:
            scheme = replace(scheme, ranks_per_node=n_ranks)
    ops = step_ops(scheme, shapes, n_ranks)
    comm = sum(op_time(op, n_ranks, cluster) for op in ops)
    comp = compression_seconds(scheme, shapes, n_ranks, costs) if costs is not None else 0.0
    return {
        "comm_s": comm,
        "compress_s": comp,
        "total_s": comm + comp,
        "sent_bytes": sum(sent_bytes(op) for op in ops),
        "nic_bytes": sum(nic_bytes(op, n_ranks, cluster.ranks_per_node) for op in ops),
        "collectives": len(ops),
        "messages": sum(steps(op) for op in ops),
    }


def loopback_step(scheme: Scheme, shapes, n_ranks: int, compute_s: float, alpha: float, bandwidth: float,
                  stretch: float, costs: Mapping | None) -> dict:  # fmt: skip
    """A measured point's prediction: the compute-only step of ``n_ranks`` processes at once, the
    collectives on the loopback and the compression, both stretched by ``stretch`` (see
    :func:`loopback_time`), in sequence."""
    ops = step_ops(scheme, shapes, n_ranks)
    comm = sum(loopback_time(op, alpha, bandwidth, stretch) for op in ops)
    comp = compression_seconds(scheme, shapes, n_ranks, costs) * stretch if costs else 0.0
    return {"compute_s": compute_s, "comm_s": comm, "compress_s": comp, "step_s": compute_s + comm + comp,
            "sent_bytes": sum(sent_bytes(op) for op in ops), "collectives": len(ops)}  # fmt: skip


def fit_loopback(points: Iterable[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``comm = alpha * messages + bytes_scaled / bandwidth`` over ``(messages,
    bytes_scaled, comm_seconds)``; ``(alpha, bandwidth)``, both kept positive."""
    pts = list(points)
    sxx = sum(m * m for m, _, _ in pts)
    sxy = sum(m * b for m, b, _ in pts)
    syy = sum(b * b for _, b, _ in pts)
    sxt = sum(m * t for m, _, t in pts)
    syt = sum(b * t for _, b, t in pts)
    det = sxx * syy - sxy * sxy
    alpha, inv_bw = ((syy * sxt - sxy * syt) / det, (sxx * syt - sxy * sxt) / det) if det > 0 else (-1.0, -1.0)
    if alpha < 0 or inv_bw <= 0:  # the better of the two one-term fits
        only_bw = syt / syy if syy else 0.0
        only_alpha = sxt / sxx if sxx else 0.0
        err_bw = sum((t - b * only_bw) ** 2 for _, b, t in pts)
        err_alpha = sum((t - m * only_alpha) ** 2 for m, _, t in pts)
        alpha, inv_bw = (0.0, only_bw) if err_bw <= err_alpha else (only_alpha, 0.0)
    return alpha, (1.0 / inv_bw if inv_bw > 0 else math.inf)
