"""``CompressionConfig``: what to compress, how to keep the error, how to move it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping

from lightning_compress.compressors import COMPRESSORS, Compressor
from lightning_compress_kernels import SUPPORTED_BITS

__all__ = [
    "CompressionConfig",
    "FEEDBACKS",
    "MOMENTUM_MODES",
    "TRANSPORTS",
    "build_config",
    "coarse_two_pass_hint",
    "sparse_ef21_hint",
]

FEEDBACKS = ("none", "ef", "ef21", "diana", "doublesqueeze")
TRANSPORTS = ("auto", "allreduce", "allgather", "two_pass")
MOMENTUM_MODES = ("auto", "lookahead", "heavy_ball", "adam_step", "optimizer")
#: the modes that always move one optimizer's momentum into the exchange (``auto`` only where it can)
MOVING_MODES = ("lookahead", "heavy_ball", "adam_step")
TWO_PASS_FROM = 4  # ranks from which transport='auto' sends non-summable payloads in two compressed passes


#: The compressors whose ``density`` the density warm-up changes.
DENSITY_COMPRESSORS = ("topk", "dgc", "randk")
_BLOCK_SIZE = 1024  # elements per scale of sign/qsgd/terngrad unless `block_size` says otherwise
_DOUBLESQUEEZE_BLOCK_SIZE = 256  # ... and with DoubleSqueeze (see CompressionConfig.block_size_resolved)
_DENSITY_WARMUP_STEPS = 100  # DGC's warm-up of topk/dgc unless `density_warmup_steps` says otherwise
_DENSITY_WARMUP_BY_DEFAULT = ("topk", "dgc")  # randk's warm-up (with DIANA) was not measured
#: The compressors with one fp32 scale per ``block_size`` elements.
BLOCK_COMPRESSORS = ("sign", "qsgd", "terngrad")
_WARMUP_DENSITY = 0.25  # where DGC's warm-up starts (75% sparsity), falling 4x per stage


def _choices(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}")


def coarse_two_pass_hint(config: "CompressionConfig", transport: str) -> str | None:
    """A hint for an exchange that compresses twice (DoubleSqueeze, or ``ef`` over ``two_pass``) with
    block scales coarser than 256 elements; ``None`` otherwise."""
    twice = config.feedback == "doublesqueeze" or (config.feedback == "ef" and transport == "two_pass")
    block = config.block_size_resolved
    if not twice or config.compressor not in BLOCK_COMPRESSORS or block <= _DOUBLESQUEEZE_BLOCK_SIZE:
        return None
    return (
        f"this exchange compresses twice (each rank's tensor, then each shard's sum over ranks): with block_size={block} "
        "sign + DoubleSqueeze trailed dense accuracy by 2 to 3 points on the digits MLP, with 256 (DoubleSqueeze's "
        "default) by about 1; set block_size=256, or lower the learning rate (see the README)"
    )


_SPARSE_EF21_DENSITY = 0.05  # EF21 with a sparsifier keeping at most this much: a hint, and a larger step


#: EF21's estimate step there unless set, by the optimizer whose momentum runs in the exchange
_SPARSE_EF21_STEP = {"sgd": 1.1, "adam": 1.1}


def _sparse_ef21(config: "CompressionConfig") -> bool:
    return config.feedback == "ef21" and config.compressor in ("topk", "dgc") and config.density <= _SPARSE_EF21_DENSITY


def sparse_ef21_hint(config: "CompressionConfig") -> str | None:
    """A hint for EF21 with ``topk``/``dgc`` keeping at most 5% of each tensor, unless its estimate step
    was set above 1 by hand; ``None`` otherwise."""
    if not _sparse_ef21(config) or (config.ef21_step is not None and config.ef21_step > 1.0):
        return None
    return (
        "EF21 holds each entry of its estimate until that entry is sent again, so at a low density it steps less far "
        "than dense: with step 1 top-k 1% + ef21 trailed dense by 1.8 (SGD + momentum) and 1.2 points (AdamW) on the "
        "digits MLP; ef21_step=None takes 1.1 with an optimizer's momentum in the exchange (0.7 behind with SGD, "
        "0.9 with AdamW, over 40 epochs), 1 otherwise; feedback=ef stayed within 1 point (see the README)"
    )


@dataclass(frozen=True)
class CompressionConfig:
    """Settings of the compressed gradient exchange, validated on construction.

    Args:
        compressor: payload format, one of ``none fp16 bf16 topk dgc randk qsgd terngrad natural sign powersgd``.
        density: fraction of entries kept by ``topk``/``dgc``/``randk``, in (0, 1]; lower compresses more.
        bits: magnitude bits of ``qsgd`` (1, 2, 4 or 8; a sign bit is added); lower compresses more.
        feedback: error compensation, one of ``none ef ef21 diana doublesqueeze``.
        transport: ``auto`` (the cheapest correct one for the number of ranks, see
            :meth:`transport_for`), ``allreduce``, ``allgather`` or ``two_pass``. Over ``two_pass``,
            ``ef`` and ``doublesqueeze`` compress both passes (the second with a server error per
            shard: DoubleSqueeze's algorithm); other feedback sends the shard sums in fp32.
        warmup_steps: optimizer steps exchanged densely before compression starts (>= 0).
        density_warmup_steps: DGC's warm-up (Lin et al., ICLR 2018, "warm-up training"): for this
            many steps after ``warmup_steps``, ``topk``/``dgc``/``randk`` keep more than ``density``:
            25% at first, 4x fewer at each of equal stages, until ``density`` (see
            :meth:`density_at`). 0: ``density`` from the first compressed step. ``None`` (default):
            100 steps for ``topk`` and ``dgc`` below 25% density, else 0 (see
            :attr:`density_warmup_steps_resolved`).
        min_numel: tensors with fewer elements, and all 1-D tensors, are exchanged densely.
        block_size: elements per scale of ``sign``/``qsgd``/``terngrad``; larger compresses more.
            ``None`` (default): 1024, or 256 with ``doublesqueeze``, whose second compression (of
            the summed shards) needs the finer scales to keep up with dense accuracy (see
            :attr:`block_size_resolved`).
        seed: base seed of every random choice (rand-k indices, stochastic rounding).
        diana_alpha: DIANA shift step size in (0, 1]; default ``1 / (omega + 1)``.
        ef21_step: EF21's estimate step in (0, 2): each rank's estimate moves by ``ef21_step`` times
            its compressed message (1: the paper's EF21). ``None`` (default): for ``topk`` and
            ``dgc`` at 5% density or less, 1.1 when an attached optimizer's momentum (SGD's, Adam's
            or AdamW's) runs in the exchange; else 1 (see :meth:`ef21_step_for`).
        dgc_sample_fraction: fraction of entries ``dgc`` samples to estimate its threshold (``topk``
            samples the same fraction, at least 4096 entries, to find its exact top-k faster).
        powersgd_rank: rank ``r`` of ``powersgd``'s approximation (>= 1): an ``n x m`` gradient sends
            ``(n + m) r`` values in two allreduces; higher is closer to dense and sends more.
        momentum: where an attached optimizer's momentum lives (see :mod:`lightning_compress.momentum`):
            ``lookahead`` moves it into the exchange and sends the Nesterov look-ahead (converges
            fastest under compression), ``heavy_ball`` moves it unchanged, ``adam_step`` (Adam and
            AdamW) runs Adam's whole step, both moments, on each rank before the exchange and
            applies the exchanged step, ``optimizer`` leaves it in the optimizer; ``auto`` is
            ``adam_step`` for Adam and AdamW with ``doublesqueeze`` on 2 ranks (without a loss
            scaler or ``amsgrad``), ``lookahead`` for SGD with momentum, Adam and AdamW otherwise,
            and ``optimizer`` for the rest.
        hierarchical: compress only across nodes (see :mod:`lightning_compress.hierarchy`): inside a
            node the compressed tensors are summed densely (all_to_all of shards, fp32), each rank
            compresses its node's sum of one shard with its own error memory (of shard size) and
            exchanges it with the ranks of the same local index on the other nodes, by the transport
            :meth:`transport_for` picks for the number of nodes; then the node all_gathers the shards.
            Feedback ``none``, ``ef`` or ``doublesqueeze``; not with GraVAC. On one node, or with one
            rank per node, rank 0 warns and the flat exchange runs.
        ranks_per_node: ranks on each node with ``hierarchical`` (ranks numbered node by node, as
            torchrun does); 0 (default) takes torchrun's ``LOCAL_WORLD_SIZE``. Registration fails
            when it is unknown or does not divide the world size.

    Raises:
        ValueError: an option has a value outside what is allowed, or options do not fit together.
        TypeError: an option has the wrong type.

    Example::

        >>> CompressionConfig.from_string("compressor=sign,feedback=doublesqueeze").transport_resolved
        'two_pass'
    """

    compressor: str = "sign"
    density: float = 0.01
    bits: int = 8
    feedback: str = "ef"
    transport: str = "auto"
    warmup_steps: int = 0
    density_warmup_steps: int | None = None
    min_numel: int = 1024
    block_size: int | None = None
    seed: int = 0
    diana_alpha: float | None = None
    ef21_step: float | None = None
    dgc_sample_fraction: float = 0.01
    momentum: str = "auto"
    powersgd_rank: int = 4
    hierarchical: bool = False
    ranks_per_node: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES[f.name]
            if value is None and f.name in _OPTIONAL_FIELDS:
                continue
            ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
            if not ok:
                names = " or ".join(t.__name__ for t in expected)
                raise TypeError(f"`{f.name}` must be {names}; got {type(value).__name__} {value!r}")
        _choices("compressor", self.compressor, tuple(COMPRESSORS))
        _choices("feedback", self.feedback, FEEDBACKS)
        _choices("transport", self.transport, TRANSPORTS)
        _choices("momentum", self.momentum, MOMENTUM_MODES)
        if not (0.0 < self.density <= 1.0) or math.isnan(self.density):
            raise ValueError(f"`density` is the fraction of entries kept and must be in (0, 1]; got {self.density!r}")
        _choices("bits", self.bits, SUPPORTED_BITS)
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0; got {self.warmup_steps!r}")
        if self.density_warmup_steps is not None and self.density_warmup_steps < 0:
            raise ValueError(f"`density_warmup_steps` must be >= 0; got {self.density_warmup_steps!r}")
        if self.density_warmup_steps and self.compressor not in DENSITY_COMPRESSORS:
            raise ValueError(
                f"`density_warmup_steps={self.density_warmup_steps}` warms up the density of {DENSITY_COMPRESSORS}; "
                f"`compressor={self.compressor!r}` has none. Use `warmup_steps` for dense steps first, or set "
                "`density_warmup_steps=0`."
            )
        if self.min_numel < 0:
            raise ValueError(f"`min_numel` must be >= 0; got {self.min_numel!r}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"`block_size` must be >= 1; got {self.block_size!r}")
        if self.seed < 0:
            raise ValueError(f"`seed` must be >= 0; got {self.seed!r}")
        if self.diana_alpha is not None and not (0.0 < self.diana_alpha <= 1.0):
            raise ValueError(f"`diana_alpha` must be in (0, 1] or None; got {self.diana_alpha!r}")
        if self.ef21_step is not None and not (0.0 < self.ef21_step < 2.0):
            raise ValueError(
                f"`ef21_step` scales EF21's estimate update and must be in (0, 2), where it keeps the compressor "
                f"contractive; got {self.ef21_step!r}"
            )
        if self.powersgd_rank < 1:
            raise ValueError(f"`powersgd_rank` must be >= 1; got {self.powersgd_rank!r}")
        if not (0.0 < self.dgc_sample_fraction <= 1.0):
            raise ValueError(f"`dgc_sample_fraction` must be in (0, 1]; got {self.dgc_sample_fraction!r}")
        self._check_pairing()
        self._check_hierarchical()

    def _check_hierarchical(self) -> None:
        if self.ranks_per_node < 0:
            raise ValueError(f"`ranks_per_node` must be >= 0 (0: from LOCAL_WORLD_SIZE); got {self.ranks_per_node!r}")
        if self.ranks_per_node and not self.hierarchical:
            raise ValueError(
                f"`ranks_per_node={self.ranks_per_node}` only applies to the hierarchical exchange; set "
                "`hierarchical=True` too, or leave `ranks_per_node` at 0"
            )
        if self.hierarchical and self.feedback not in ("none", "ef", "doublesqueeze"):
            raise ValueError(
                f"`hierarchical=True` with `feedback={self.feedback!r}` is not supported: EF21 and DIANA keep estimates "
                "of whole tensors that all ranks share, while the hierarchical exchange compresses one shard per rank "
                "across nodes. Use `feedback='ef'`, `'doublesqueeze'` or `'none'`, or `hierarchical=False`."
            )
        if self.hierarchical and self.compressor == "powersgd":
            raise ValueError(
                "`hierarchical=True` with `compressor='powersgd'` is not supported (PowerSGD factors whole matrices, "
                "the hierarchical exchange cuts tensors into shards); use another compressor or `hierarchical=False`"
            )

    # ----- pairing rules -------------------------------------------------------------------
    def _check_pairing(self) -> None:
        comp = self.make_compressor()
        probe = max(self.block_size_resolved, 1 << 20)  # a large tensor: the bounds that matter in practice
        if self.feedback == "diana" and not comp.unbiased:
            unbiased = tuple(n for n, c in COMPRESSORS.items() if c.unbiased)
            raise ValueError(
                f"`feedback='diana'` needs an unbiased compressor, one of {unbiased}; got `compressor={self.compressor!r}` "
                "(biased). Use `feedback='ef21'` or `'ef'` with biased compressors."
            )
        if self.feedback in ("ef", "ef21", "doublesqueeze") and comp.alpha(probe) <= 0.0:
            raise ValueError(
                f"`feedback={self.feedback!r}` needs a contractive compressor (E||C(x)-x||^2 <= (1-alpha)||x||^2 with "
                f"alpha > 0), or its memory grows without bound; `compressor={self.compressor!r}` with these settings "
                f"has omega={comp.omega(probe):.3g} >= 1. Use topk, dgc, sign, natural, fp16 or bf16; for qsgd more "
                "`bits` or a smaller `block_size`; or `feedback='diana'` (or 'none') for unbiased compressors."
            )
        if self.feedback == "none" and not comp.unbiased and self.compressor not in ("none", "fp16", "bf16"):
            warnings.warn(
                f"`feedback='none'` with the biased compressor {self.compressor!r} drops the compression error for "
                "good and may not converge; consider `feedback='ef'`.",
                UserWarning,
                stacklevel=3,
            )
        if self.compressor == "powersgd" and self.feedback not in ("ef", "none"):
            raise ValueError(
                f"`compressor='powersgd'` keeps its error with `feedback='ef'` (or none with `'none'`); got "
                f"`feedback={self.feedback!r}`. Its messages are summed by allreduce, so no server step "
                "(doublesqueeze) is needed, and it is biased (not for diana)."
            )
        if self.compressor == "powersgd" and self.transport not in ("auto", "allreduce"):
            raise ValueError(
                f"`compressor='powersgd'` travels by two allreduces (of P, then of Q); got `transport={self.transport!r}`. "
                "Use `transport='auto'` or `'allreduce'`."
            )
        if self.transport == "allreduce" and not comp.summable and self.compressor != "powersgd":
            summable = tuple(n for n, c in COMPRESSORS.items() if c.summable)
            raise ValueError(
                f"`transport='allreduce'` can only carry payloads that add up, from one of {summable}; got "
                f"`compressor={self.compressor!r}`. Use `transport='allgather'`, `'two_pass'` or `'auto'`."
            )
        if self.feedback == "doublesqueeze" and self.transport not in ("auto", "two_pass"):
            raise ValueError(
                f"`feedback='doublesqueeze'` compresses on the aggregating side too and needs `transport='two_pass'` "
                f"(or 'auto'); got `transport={self.transport!r}`"
            )

    # ----- derived ---------------------------------------------------------------------------
    def ef21_step_for(self, momentum: str | None) -> float:
        """EF21's estimate step: ``ef21_step`` where it is set; otherwise, for ``topk``/``dgc`` at 5%
        density or less, 1.1 when ``momentum`` is ``"sgd"`` or ``"adam"`` (the kind of optimizer whose
        momentum runs in the exchange), and 1 everywhere else.

        At a low density each entry of the estimate keeps its value until it is sent again, so the
        estimate trails the gradient and the run steps as if its rate were lower. A larger step (EF21
        with the compressor ``step * C``, still contractive) makes up for that; too large, it amplifies
        the noise of late training. On the digits MLP (16 seeds, the largest gap from epoch 5 to 40)
        top-k 1% + EF21 trailed dense by 1.8 points with SGD + momentum at step 1, by 0.7 at 1.1 and
        1.1 at 1.2; with AdamW by 1.2 at step 1, 0.9 at 1.1 and 1.7 at 1.2
        (``benchmarks/results/convergence_ef21_step*.md``).

        >>> cfg = CompressionConfig(compressor="topk", density=0.01, feedback="ef21")
        >>> cfg.ef21_step_for("sgd"), cfg.ef21_step_for("adam"), cfg.ef21_step_for(None)
        (1.1, 1.1, 1.0)
        >>> cfg.replace(ef21_step=1.5).ef21_step_for(None)
        1.5
        """
        if self.ef21_step is not None:
            return float(self.ef21_step)
        return _SPARSE_EF21_STEP.get(momentum, 1.0) if _sparse_ef21(self) else 1.0

    @property
    def block_size_resolved(self) -> int:
        """Elements per scale: ``block_size``, or where it is ``None``, 1024, and 256 with ``doublesqueeze``.

        DoubleSqueeze compresses twice (each rank's tensor, then each shard's sum over ranks, each
        with its own error): with 1024 elements per scale, sign + DoubleSqueeze trailed dense
        accuracy by 2.0 (SGD + momentum) and 2.8 points (AdamW) on the digits MLP, with 256 by 0.9
        and 1.3, for 9% more bytes (``benchmarks/results/convergence_doublesqueeze_block_mlp.md``).

        >>> CompressionConfig(feedback="doublesqueeze").block_size_resolved, CompressionConfig().block_size_resolved
        (256, 1024)
        """
        if self.block_size is not None:
            return self.block_size
        return _DOUBLESQUEEZE_BLOCK_SIZE if self.feedback == "doublesqueeze" else _BLOCK_SIZE

    @property
    def density_warmup_steps_resolved(self) -> int:
        """Steps of the density warm-up: ``density_warmup_steps``, or where it is ``None``, 100 for
        ``topk`` and ``dgc`` below 25% density and 0 for everything else (``randk`` included: its
        unbiased estimates with DIANA were not measured with a warm-up).

        Without it, top-k 1% + ``ef`` trailed dense accuracy on the digits MLP by up to 1.4 (SGD +
        momentum) and 5.7 points (AdamW) from epoch 5 on (8 seeds), with 100 steps by 0.9 and 0.6
        (16 seeds, ``benchmarks/results/convergence_density_warmup100_mlp.md``); the warm-up's
        100 steps send about as many bytes as 1100 steps at 1% would. GraVAC, which picks the
        density itself, runs without it (:meth:`without_default_density_warmup`).

        >>> CompressionConfig(compressor="topk").density_warmup_steps_resolved, CompressionConfig().density_warmup_steps_resolved
        (100, 0)
        """
        if self.density_warmup_steps is not None:
            return self.density_warmup_steps
        if self.compressor in _DENSITY_WARMUP_BY_DEFAULT and self.density < _WARMUP_DENSITY:
            return _DENSITY_WARMUP_STEPS
        return 0

    def without_default_density_warmup(self) -> "CompressionConfig":
        """This config with ``density_warmup_steps=0`` where the warm-up is on only by default (else itself)."""
        if self.density_warmup_steps is None and self.density_warmup_steps_resolved:
            return self.replace(density_warmup_steps=0)
        return self

    @property
    def transport_resolved(self) -> str:
        """The transport ``auto`` stands for on 2 ranks (see :meth:`transport_for` for more)."""
        return self.transport_for(2)

    def transport_for(self, world_size: int, adaptive: bool = False) -> str:
        """The transport this config uses on ``world_size`` ranks (``adaptive``: GraVAC is attached).

        ``auto`` picks, from the payload and the number of ranks ``n``:

        * ``doublesqueeze``: ``two_pass``;
        * payloads that add up (``none fp16 bf16``, shared-seed ``randk``), and ``powersgd`` (two
          allreduces of its factors): ``allreduce``, whose ring sends ``2(n-1)/n`` of the payload per
          rank, so bytes per rank stay flat in ``n``;
        * other payloads with ``ef``, from :data:`TWO_PASS_FROM` = 4 ranks on and without GraVAC:
          ``two_pass``, both passes compressed, which sends about ``2(n-1)/n`` payloads per rank;
          ``allgather`` sends ``n-1``, at least twice as much from 4 ranks on, while on 2 and 3
          ranks it sends at most 1.5x as much with one collective instead of two and keeps
          ``ef``'s single compression;
        * otherwise ``allgather``, whose bytes per rank grow with ``n``: ``ef21`` (which needs a
          contractive compressor, none of which adds up) and ``diana`` with payloads that do not
          add up (every rank must see the exact sum of the compressed messages; ``diana`` with
          ``randk`` travels by allreduce and stays flat), ``none`` (an fp32 second pass would cost
          about half a dense allreduce), and GraVAC (it sends at a CF of its own).

        The payload size does not move the choice: both transports' bytes are proportional to it.

        Example::

            >>> cfg = CompressionConfig(compressor="topk")
            >>> cfg.transport_for(2), cfg.transport_for(8), cfg.transport_for(8, adaptive=True)
            ('allgather', 'two_pass', 'allgather')
        """
        if self.transport != "auto":
            return self.transport
        if self.feedback == "doublesqueeze":
            return "two_pass"
        if COMPRESSORS[self.compressor].summable or self.compressor == "powersgd":
            return "allreduce"
        if self.feedback == "ef" and world_size >= TWO_PASS_FROM and not adaptive:
            return "two_pass"
        return "allgather"

    def density_at(self, step: int) -> float:
        """The density ``topk``/``dgc``/``randk`` keep at ``step`` (0-based, dense warm-up steps included).

        During the ``density_warmup_steps`` steps after ``warmup_steps`` it starts at 25% and falls
        4x per stage, in ``ceil(log4(0.25 / density))`` stages of equal length (a warm-up shorter
        than that skips stages), never below ``density``; before and after, ``density``. Every rank
        computes the same value from the step, so a resumed run continues the schedule where it stopped.

        Example::

            >>> cfg = CompressionConfig(compressor="topk", density=0.01, density_warmup_steps=69)
            >>> [cfg.density_at(s) for s in (0, 22, 23, 46, 68, 69)]
            [0.25, 0.25, 0.0625, 0.015625, 0.015625, 0.01]
        """
        into, length = step - self.warmup_steps, self.density_warmup_steps_resolved
        if not 0 <= into < length or self.density >= _WARMUP_DENSITY:
            return self.density
        stages = max(1, math.ceil(math.log(_WARMUP_DENSITY / self.density, 4) - 1e-9))
        stage = into * stages // length
        return max(self.density, _WARMUP_DENSITY * 0.25**stage)

    def make_compressor(self) -> Compressor:
        """A compressor instance with this config's settings."""
        extra = {"rank": self.powersgd_rank} if self.compressor == "powersgd" else {}
        return COMPRESSORS[self.compressor](
            density=self.density, bits=self.bits, block_size=self.block_size_resolved, sample_fraction=self.dgc_sample_fraction,
            **extra,
        )

    def replace(self, **changes: Any) -> "CompressionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict of the settings (safe for ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CompressionConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming the allowed ones."""
        unknown = sorted(set(values) - set(_FIELD_TYPES))
        if unknown:
            raise ValueError(f"unknown compression option(s) {unknown}; allowed: {sorted(_FIELD_TYPES)}")
        return cls(**dict(values))

    @classmethod
    def from_string(cls, text: str) -> "CompressionConfig":
        """Parse ``"key=value,key=value"``; values are converted to each field's type."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not key:
                raise ValueError(f"compression setting {item!r} is not of the form key=value (in {text!r})")
            if key in values:
                raise ValueError(f"compression option {key!r} is given twice in {text!r}")
            if key not in _FIELD_TYPES:
                raise ValueError(f"unknown compression option {key!r} in {text!r}; allowed: {sorted(_FIELD_TYPES)}")
            values[key] = _parse_value(key, raw)
        return cls.from_dict(values)


def build_config(
    compression: CompressionConfig | Mapping[str, Any] | str | None = None, **options: Any
) -> CompressionConfig:
    """A validated :class:`CompressionConfig` from a base (config, dict or ``"k=v,..."``) and field overrides.

    The one path from options to a config: the Lightning and Fabric strategies, ``register_compression``
    and Accelerate's flag (once its own grammar -- YAML files, GraVAC keys -- is read) all end here.
    ``None`` values in ``options`` mean "not given"; given fields override the base.

    Example::

        >>> build_config("compressor=topk", density=0.1, feedback="ef21").density
        0.1
    """
    unknown = sorted(set(options) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown compression option(s) {unknown}; allowed: {sorted(_FIELD_TYPES)}")
    if compression is None:
        base: dict[str, Any] = {}
    elif isinstance(compression, CompressionConfig):
        base = compression.to_dict()
    elif isinstance(compression, str):
        base = CompressionConfig.from_string(compression).to_dict()
    elif isinstance(compression, Mapping):
        base = CompressionConfig.from_dict(compression).to_dict()
    else:
        raise TypeError(
            "compression settings must be a CompressionConfig, a dict or a 'key=value,...' string; "
            f"got {type(compression).__name__}"
        )
    base.update({k: v for k, v in options.items() if v is not None})
    return CompressionConfig.from_dict(base)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "compressor": (str,),
    "density": (float, int),
    "bits": (int,),
    "feedback": (str,),
    "transport": (str,),
    "warmup_steps": (int,),
    "density_warmup_steps": (int,),
    "min_numel": (int,),
    "block_size": (int,),
    "seed": (int,),
    "diana_alpha": (float, int),
    "ef21_step": (float, int),
    "dgc_sample_fraction": (float, int),
    "momentum": (str,),
    "powersgd_rank": (int,),
    "hierarchical": (bool,),
    "ranks_per_node": (int,),
}

#: fields whose ``None`` means a default that depends on other fields
_OPTIONAL_FIELDS = ("block_size", "density_warmup_steps", "diana_alpha", "ef21_step")

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(key: str, raw: str) -> Any:
    types = _FIELD_TYPES[key]
    if key in _OPTIONAL_FIELDS and raw.lower() in ("none", ""):
        return None
    if str in types:
        return raw
    if bool in types:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"`{key}` must be true or false (or 1/0, yes/no, on/off); got {raw!r}")
    try:
        return int(raw) if types[0] is int else float(raw)
    except ValueError:
        kind = "an integer" if types[0] is int else "a number"
        raise ValueError(f"`{key}` must be {kind}; got {raw!r}") from None
