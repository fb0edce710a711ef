"""What a compressed run says about itself: the start and end lines, the metrics, the per-tensor view.

Framework-free: the Lightning strategy, the Fabric strategy and ``accelerate_compress`` all print
the same two lines and log the same metric names through these functions.

* :func:`start_line`: the settings that run and the bytes one step is expected to send, per rank,
  against a dense DDP allreduce of the same tensors (an estimate from the tensor sizes; it leaves out
  the few bytes of flags per bucket).
* :func:`end_line`: steps, steps compressed, bytes sent against dense, mean gain, and the time the
  exchange took, since the start of training (a resumed run includes what its checkpoint counted).
* :func:`step_metrics` / :func:`gravac_metrics`: the per-step metrics, one dict each.
* :func:`layer_rows`, :func:`layer_table`, :func:`layer_metrics`: which tensors are compressed, what
  each one costs per step, and how well it compresses.

Two numbers are easy to confuse. ``compression/ratio`` counts *bytes on the wire*: what a dense ring
allreduce would send over what this rank sent, with every payload's indices and scales, the tensors
sent densely, and the transport's fan-out (an all_gather sends a payload to every other rank).
GraVAC's ``gravac/cf`` is the *nominal compression factor* of the compressed tensors: dense elements
over elements kept (top-k at density 0.05 is CF 20). Top-k sends an int32 index with every fp32 value,
so at CF 20 it sends 8 bytes for every 20 x 4 dense bytes, and on 2 ranks ``compression/ratio`` is
about 10, less where biases and other small tensors travel densely.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from lightning_compress.adaptive import compressor_at
from lightning_compress.compressors import Compressor
from lightning_compress.compressors.base import WIRE_ALIGN
from lightning_compress.config import (
    BLOCK_COMPRESSORS,
    DENSITY_COMPRESSORS,
    CompressionConfig,
    coarse_two_pass_hint,
    sparse_ef21_hint,
)
from lightning_compress.nodes import expected_sent, node_layout
from lightning_compress.transport import shard_bounds

__all__ = [
    "LayerRow",
    "TensorBytes",
    "end_line",
    "expected_bytes",
    "format_bytes",
    "gravac_metrics",
    "layer_metrics",
    "layer_rows",
    "layer_table",
    "report_logger",
    "settings_text",
    "start_line",
    "step_metrics",
]

#: Where the start and end lines go (rank 0, INFO). It prints to stderr unless the program configured logging.
report_logger = logging.getLogger("lightning_compress.report")
if report_logger.level == logging.NOTSET:
    report_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not report_logger.handlers:
    # As Lightning does for its own logger: printed unless the program set up logging itself.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    report_logger.addHandler(_handler)
    report_logger.propagate = False


# ----- bytes --------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB, three significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _compressible(shape: Sequence[int], config: CompressionConfig) -> str | None:
    """Why a tensor of ``shape`` is sent densely (``None``: it is compressed); the hook's own rule."""
    if len(shape) <= 1:
        return "1-D"
    if math.prod(shape) < max(config.min_numel, 1):
        return f"< min_numel={config.min_numel}"
    return None


@dataclass
class TensorBytes:
    """What one tensor costs per step on one rank: bytes sent, and what a dense allreduce would send."""

    name: str
    shape: tuple[int, ...]
    dense_reason: str | None  # None: compressed; else why it travels densely
    sent_bytes: float
    dense_bytes: float


def _payload(comp: Compressor, numel: int) -> int:
    """Bytes of one payload in a wire buffer (byte wires align every payload to ``WIRE_ALIGN``)."""
    nbytes = comp.payload_nbytes(numel)
    return -(-nbytes // WIRE_ALIGN) * WIRE_ALIGN if comp.payload_dtype == torch.uint8 else nbytes


def _sent(comp: Compressor, transport: str, numel: int, world: int, server: bool) -> float:
    """Bytes one rank sends for one compressed tensor (the counting of ``Collectives``)."""
    if world == 1:
        return 0.0
    if transport == "allreduce":
        return _payload(comp, numel) * 2.0 * (world - 1) / world
    if transport == "allgather":
        return _payload(comp, numel) * float(world - 1)
    longest = max(hi - lo for lo, hi in (shard_bounds(numel, world, j) for j in range(world)))
    first = world * _payload(comp, longest) * (world - 1) / world  # all_to_all of one row per rank
    second = (_payload(comp, longest) if server else 4 * longest) * float(world - 1)  # all_gather
    return first + second


def expected_bytes(
    config: CompressionConfig,
    params: Iterable[tuple[str, Sequence[int], int]],
    world_size: int,
    compressor: Compressor | None = None,
    transport: str | None = None,
) -> list[TensorBytes]:
    """Per tensor, the bytes one rank sends in a compressed step and in a dense one.

    Args:
        config: the settings that run.
        params: ``(name, shape, bytes per element)`` of every parameter DDP reduces.
        world_size: number of ranks (with one, nothing is sent).
        compressor: the compressor to count (default: the config's; GraVAC's at its current factor).
        transport: the transport that runs (default: the one ``config`` picks on ``world_size`` ranks).
    """
    comp = compressor or config.make_compressor()
    transport = transport or _transport(config, world_size)
    layout = node_layout(config, world_size) if transport == "hierarchical" else None
    ring = 2.0 * (world_size - 1) / world_size
    rows = []
    for name, shape, element_size in params:
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        reason = _compressible(shape, config)
        dense = numel * element_size * ring
        # Over two_pass, ef and doublesqueeze compress the second pass too (a server error per shard).
        server = config.feedback in ("ef", "doublesqueeze")
        if reason is not None:
            sent = dense
        elif config.compressor == "powersgd":  # P and Q by allreduce; (n + m) r fp32 values, or the matrix itself
            sent = 4.0 * comp.payload_numel_shaped(shape) * ring if world_size > 1 else 0.0
        elif transport == "hierarchical" and layout is not None:  # fp32 inside the node, compressed shards across
            sent = expected_sent(config, comp, numel, layout)[0]
        else:
            sent = _sent(comp, transport, numel, world_size, server)
        rows.append(TensorBytes(name, shape, reason, sent, dense))
    return rows


def _transport(config: CompressionConfig, world_size: int, adaptive: bool = False) -> str:
    """The transport ``config`` runs on ``world_size`` ranks."""
    if not adaptive and getattr(config, "hierarchical", False) and node_layout(config, world_size) is not None:
        return "hierarchical"
    pick = getattr(config, "transport_for", None)
    return pick(world_size, adaptive=adaptive) if pick is not None else config.transport_resolved


# ----- the two lines ------------------------------------------------------------------------------
def settings_text(config: CompressionConfig, transport: str | None = None) -> str:
    """The settings that matter for this compressor, e.g. ``topk(density=0.01)/ef21 via allgather``."""
    details = []
    if config.compressor in DENSITY_COMPRESSORS:
        details.append(f"density={config.density:g}")
    if config.compressor == "qsgd":
        details.append(f"bits={config.bits}")
    if config.compressor in BLOCK_COMPRESSORS:
        details.append(f"block_size={config.block_size_resolved}")
    if config.compressor == "powersgd":
        details.append(f"rank={config.powersgd_rank}")
    comp = config.compressor + (f"({', '.join(details)})" if details else "")
    feedback = config.feedback
    if feedback == "ef21":  # EF21's estimate step where it is not 1 (CompressionConfig.ef21_step_for)
        always, sgd, adam = (config.ef21_step_for(kind) for kind in (None, "sgd", "adam"))
        if always != 1.0:
            feedback += f"(step={always:g})"
        elif sgd == adam != 1.0:
            feedback += f"(step={sgd:g} with an optimizer's momentum in the exchange, else 1)"
        elif (sgd, adam) != (1.0, 1.0):
            feedback += f"(step={sgd:g} with SGD's momentum, {adam:g} with Adam's, else 1)"
    extra = [f"min_numel={config.min_numel}", f"momentum={config.momentum}"]
    if config.warmup_steps:
        extra.append(f"warmup_steps={config.warmup_steps}")
    if config.density_warmup_steps_resolved:
        extra.append(f"density_warmup_steps={config.density_warmup_steps_resolved}")
    return f"{comp}/{feedback} via {transport or config.transport_resolved} ({', '.join(extra)})"


def start_line(
    tool: str,
    config: CompressionConfig,
    params: Iterable[tuple[str, Sequence[int], int]],
    world_size: int,
    gravac_theta_min: float | None = None,
    transport: str | None = None,
) -> str:
    """The line printed when a compressed run starts (rank 0).

    Args:
        tool: ``"lightning-compress"`` or ``"accelerate-compress"``.
        config: the settings that run.
        params: ``(name, shape, bytes per element)`` of every parameter DDP reduces.
        world_size: number of ranks.
        gravac_theta_min: with GraVAC, the factor it starts at (the estimate counts that one).
        transport: the transport that runs (default: the one ``config`` picks on ``world_size`` ranks).
    """
    if gravac_theta_min is not None:
        config = config.without_default_density_warmup()  # GraVAC picks the density itself (state.attach_adaptive)
    comp = compressor_at(config, gravac_theta_min) if gravac_theta_min is not None else None
    transport = transport or _transport(config, world_size, adaptive=gravac_theta_min is not None)
    rows = expected_bytes(config, params, world_size, comp, transport)
    sent = sum(r.sent_bytes for r in rows)
    dense = sum(r.dense_bytes for r in rows)
    n_dense = sum(r.dense_reason is not None for r in rows)
    ratio = f"{dense / sent:.1f}x fewer" if sent else "nothing sent"
    line = (
        f"{tool}: compressing gradients on {world_size} ranks with {settings_text(config, transport)}: "
        f"about {format_bytes(sent)} per step per rank against {format_bytes(dense)} for dense DDP ({ratio}); "
        f"{len(rows) - n_dense} of {len(rows)} tensors compressed, {n_dense} sent densely (1-D or < min_numel)"
    )
    layout = node_layout(config, world_size) if transport == "hierarchical" else None
    if layout is not None:  # what crosses nodes: the compressed shards, and the dense tensors' sums over all ranks
        comp = comp or config.make_compressor()
        across = sum(r.sent_bytes if r.dense_reason else expected_sent(config, comp, math.prod(r.shape), layout)[1]
                     for r in rows)  # fmt: skip
        line += f"; about {format_bytes(across)} of it across nodes ({layout.nodes} nodes of {layout.ranks_per_node} ranks)"
    if config.warmup_steps:
        line += f"; the first {config.warmup_steps} steps are dense"
    start = config.density_at(config.warmup_steps)
    if start != config.density:
        line += (f"; density warm-up: {config.compressor} keeps {start:g} at first, down to {config.density:g} after "
                 f"{config.density_warmup_steps_resolved} compressed steps (more bytes then than estimated here)")  # fmt: skip
    if gravac_theta_min is not None:
        line += f"; GraVAC picks the compression factor, starting at CF {gravac_theta_min:g}"
    hints = [coarse_two_pass_hint(config, transport)]
    if gravac_theta_min is None:  # under GraVAC the density is GraVAC's, not the config's
        hints.append(sparse_ef21_hint(config))
    for hint in hints:
        if hint is not None:
            line += f"; {hint}"
    return line


def end_line(tool: str, state: Any) -> str:
    """The summary printed when a compressed run ends (rank 0): totals since the start of training."""
    s = state.stats
    dense = s._dense_sent(s.dense_bytes_total)
    ratio = f"{dense / s.sent_bytes_total:.1f}x fewer" if s.sent_bytes_total else "nothing sent"
    mean_gain = f"{s.mean_gain:.3f}" if s.compressed_steps else "n/a"
    exchange = s.encode_seconds_total + s.wait_seconds_total
    return (
        f"{tool}: {s.steps} steps, {s.compressed_steps} compressed, on {state.world_size} ranks with "
        f"{settings_text(state.config, state.transport)}: sent {format_bytes(s.sent_bytes_total)} per rank against "
        f"{format_bytes(dense)} for dense DDP ({ratio}); mean gain {mean_gain}; exchange {exchange:.2f} s "
        f"on the training thread (compress and launch {s.encode_seconds_total:.2f} s, waiting "
        f"{s.wait_seconds_total:.2f} s) and {s.decode_seconds_total:.2f} s decoding in callbacks"
    )


# ----- metrics ------------------------------------------------------------------------------------
def step_metrics(state: Any, prefix: str = "compression/") -> dict[str, float]:
    """This rank's numbers of the last step (see :mod:`lightning_compress.callbacks` for their meaning)."""
    s = state.stats
    return {
        prefix + "ratio": float(s.ratio),
        prefix + "bytes_sent": float(s.sent_bytes_last_step),
        prefix + "bytes_sent_total": float(s.sent_bytes_total),
        prefix + "dense_bytes": float(s.dense_bytes_last_step),
        prefix + "gain": float(s.gain),
    }


def gravac_metrics(run: Any, prefix: str = "gravac/") -> dict[str, float]:
    """GraVAC's numbers of the last observed step (identical on every rank); empty before the first."""
    last = run.last
    if not last:
        return {}
    ctrl = run.controller
    return {
        prefix + "cf": float(last["cf"]),
        prefix + "gain": float(last["gain"]),
        prefix + "gain_min": float(last["gain_min"]),
        prefix + "gain_candidate": float(last["gain_candidate"]),
        prefix + "theta_min": float(ctrl.theta_min),
        prefix + "candidate_cf": float(ctrl.candidate_cf),
        prefix + "throughput": float(last["throughput"]),
    }


# ----- per tensor ---------------------------------------------------------------------------------
@dataclass
class LayerRow:
    """One tensor in the per-tensor view.

    ``gain`` is measured on this tensor alone, at the step the view was taken: the compressor applied
    to the averaged gradient divided by the world size plus this rank's memory (what a rank would send
    if its gradient were the average). It ranks tensors by how well they compress; the exact gain of
    what was sent, over all tensors, is ``compression/gain``. ``None`` for dense tensors and where no
    gradient was there to measure.
    """

    name: str
    shape: tuple[int, ...]
    sent_as: str  # "compressed" or "dense (why)"
    sent_bytes: float
    dense_bytes: float
    gain: float | None

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.sent_bytes if self.sent_bytes else 1.0


def _probe_gain(state: Any, comp: Compressor, name: str, grad: torch.Tensor) -> float | None:
    x = grad.detach().reshape(-1).to(torch.float32) / state.world_size
    fb, mem = state.feedback, state.memory.get(name)
    if mem is not None and all(t.numel() == x.numel() for t in mem.values()):
        if fb.fused_residual and fb.memory_keys:
            x = x + mem[fb.memory_keys[0]]
        elif not fb.fused_residual:
            x = x - fb.shift(mem)
    if not bool(torch.isfinite(x).all()):
        return None
    enc = comp.compress(x, seed=state.seed(name, 0) if name in state.param_index else 0)
    norm = float(enc.norm_sq)
    return 1.0 - float(enc.err_sq) / norm if norm > 0 and math.isfinite(norm) else None


def layer_rows(state: Any, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], probe: bool = True) -> list[LayerRow]:
    """The per-tensor view of ``state``'s model, in parameter order.

    Args:
        state: a registered :class:`~lightning_compress.CompressionState`.
        named_parameters: the model's ``named_parameters()`` (the module DDP wraps).
        probe: measure each compressed tensor's gain from its ``.grad`` (one compression per tensor).
    """
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    config, comp = state.config, state.compressor
    run = getattr(state, "adaptive", None)
    if run is not None and run.last:
        cf = float(run.last["cf"])
        comp = run.compressor(cf) if cf > 1.0 else comp
    sizes = expected_bytes(config, [(n, p.shape, p.element_size()) for n, p in params], state.world_size, comp,
                           state.transport)  # fmt: skip
    rows = []
    for (name, p), size in zip(params, sizes):
        dense = size.dense_reason is not None or getattr(p.grad, "is_sparse", False)
        reason = "sparse" if getattr(p.grad, "is_sparse", False) else size.dense_reason
        gain = None
        if probe and not dense and p.grad is not None:
            gain = _probe_gain(state, comp, name, p.grad)
        shown = name.removeprefix("_forward_module.")  # Lightning's wrapper around the LightningModule
        rows.append(LayerRow(shown, size.shape, f"dense ({reason})" if dense else "compressed",
                             size.dense_bytes if dense else size.sent_bytes, size.dense_bytes, gain))  # fmt: skip
    return rows


def layer_table(rows: Sequence[LayerRow], tool: str = "lightning-compress") -> str:
    """The per-tensor view as a text table: compressed tensors by bytes sent, then the dense ones."""
    rows = sorted(rows, key=lambda r: (r.sent_as != "compressed", -r.dense_bytes))
    header = ("tensor", "shape", "sent as", "bytes/step", "dense bytes/step", "ratio", "gain")
    body = [
        (r.name, "x".join(map(str, r.shape)) or "scalar", r.sent_as, format_bytes(r.sent_bytes),
         format_bytes(r.dense_bytes), f"{r.ratio:.1f}x", "-" if r.gain is None else f"{r.gain:.3f}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = [f"{tool}: per-tensor view (bytes one rank sends per step)"]
    for cells in (header, *body):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def layer_metrics(rows: Sequence[LayerRow], prefix: str = "compression/") -> dict[str, float]:
    """``<prefix>layer/<tensor>/{ratio,bytes_sent,gain}`` for every tensor (gain where measured)."""
    out: dict[str, float] = {}
    for r in rows:
        key = f"{prefix}layer/{r.name}/"
        out[key + "ratio"] = float(r.ratio)
        out[key + "bytes_sent"] = float(r.sent_bytes)
        if r.gain is not None:
            out[key + "gain"] = float(r.gain)
    return out
