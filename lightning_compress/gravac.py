"""GraVAC's decision logic: which compression factor to send, step by step.

GraVAC (Tyagi and Swany, "GraVAC: Adaptive Compression for Communication-Efficient
Distributed DL Training", IEEE CLOUD 2023, arXiv:2305.12201) picks the compression factor
(CF = dense size / compressed size; top-k density 0.01 is CF 100) online from the
*compression gain* ``gain = 1 - ||C(g) - g||^2 / ||g||^2`` of the error-compensated
gradient ``g``. This module holds only the framework-agnostic controller: plain floats in,
plain floats out, no tensors, no ``torch.distributed``, no randomness and no clock, so every
rank that is fed the same numbers makes the same decisions. One step of the caller::

    plan = controller.plan()                        # pure: the decision for this step
    g_min = C(g, plan.min_cf)                       # the hook's work, per tensor
    g_c = C(g_min, plan.candidate_cf / plan.min_cf) # candidate; g_min itself if the CFs are equal
    send g_c, g_min or g as plan.send_cf says       # None: dense (and clear the residual)
    controller.observe(gain_min, gain_c, iteration_time, samples)  # gains combined over ranks

Decision (:meth:`GraVACController.plan`) from the EWMAs of the two gains observed *through
the previous step*: send the candidate CF if its EWMA gain is at least ``epsilon``, else
``theta_min`` if its EWMA gain is at least ``epsilon``, else the dense gradient. The one-step
lag keeps any collective (combining the gains over ranks) out of the path between compressing
and sending. Before the first observation the EWMAs are unknown and the plan sends at
``theta_min``. While the candidate's EWMA is unknown (right after the candidate CF changed,
see below) the candidate is not sent: the plan falls back to the ``theta_min`` test.

Bookkeeping (:meth:`GraVACController.observe`): both EWMAs take the new gains with weight
``beta`` (``ewma = (1 - beta) * ewma + beta * new``; an unknown EWMA starts at the sample);
the compression throughput of the CF sent at this step, ``Tc = samples / iteration_time *
gain_of_the_sent_tensor`` (the dense gradient is CF 1.0 with gain 1.0), is averaged per CF.
Gains may be negative (unbiased compressors with large variance); they are not clamped.
Every ``window`` observations, in this order:

1. promotion: if ``|EWMA gain_min - EWMA gain_candidate| <= omega`` the candidate loses
   nothing against ``theta_min``, so ``theta_min`` moves up to the candidate CF (event
   ``'promote'``), taking the candidate's EWMA with it. ``theta_s`` is kept and keeps scaling
   from its current value; ``theta_min`` never exceeds ``theta_max``.
2. settling (until settled): among the CFs at or above the (possibly just promoted)
   ``theta_min`` with a recorded throughput, take the two with the best mean ``Tc``
   (ties broken towards the lower CF); if ``|T1 - T2| <= omega * max(|T1|, |T2|)`` more
   compression no longer buys throughput, and the controller settles on the lower of the two
   CFs (event ``'settle'``): from then on it is the candidate CF and ``theta_s`` stops
   scaling. Settling is final. CFs below ``theta_min`` (the dense CF 1.0, CFs left behind by
   a promotion) are not eligible: they are no longer what the candidate measures.
3. scaling (unless settled): ``theta_s <- theta_s ** 2`` (``'exponential'``) or
   ``theta_s <- 2 * theta_s`` (``'geometric'``), and the candidate CF is
   ``min(theta_min * theta_s, theta_max)`` (event ``'scale'``, or ``'cap'`` when the candidate
   is at ``theta_max``). Once ``theta_min * theta_s >= theta_max`` the candidate stays at
   ``theta_max`` and ``theta_s`` stops growing (event ``'cap'`` at each later window end).

When a window end moves the candidate to a CF whose gain was never measured, the candidate's
EWMA is reset to unknown (it equals the ``theta_min`` EWMA when the candidate is
``theta_min``), so a CF is only sent after its gain was seen at least once.

Defaults are the paper's: ``theta_min`` 10; ``theta_max`` 1000 (exponential) or 2000
(geometric); ``epsilon`` 0.7 (0.9 is the paper's conservative setting); ``omega`` 0.01;
``window`` 500 (exponential) or 2000 (geometric); ``beta = world_size / 100`` clamped into
(0, 1].

Ladder (an extension for compressors with a few discrete CFs, e.g. QSGD with 8, 4, 2 or 1
magnitude bits plus a sign bit per fp32 element: CFs 32/9, 32/5, 32/3, 32/2): CFs are ladder
entries. ``theta_min`` defaults to the first entry and an explicit one snaps down to the
highest entry not above it (the first entry if it is below all); ``theta_max`` defaults to the
top entry and an explicit one leaves out the entries above it. The candidate is the entry
``k = log2(theta_s)`` steps above ``theta_min`` (exponential: 1, 2, 4, ...; geometric:
1, 2, 3, ...), capped at the top usable entry; promotion moves ``theta_min`` to that entry.

Example::

    >>> c = GraVACController(window=2)
    >>> c.plan()
    Plan(send_cf=10.0, min_cf=10.0, candidate_cf=20.0)
    >>> for _ in range(2):
    ...     c.observe(0.99, 0.9, iteration_time=0.5)
    >>> c.last_event, c.candidate_cf, c.plan().send_cf   # the new candidate's gain is unknown
    ('scale', 40.0, 10.0)
    >>> c.observe(0.99, 0.9, iteration_time=0.5)
    >>> c.plan().send_cf
    40.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from lightning_compress.gravac_checkpoint import ControllerCheckpointing
from lightning_compress.gravac_params import EVENTS, SCALINGS, _finite, check_parameters

__all__ = ["GraVACController", "Plan", "SCALINGS", "EVENTS"]


@dataclass(frozen=True)
class Plan:
    """The decision for one step.

    Attributes:
        send_cf: CF to send this step (``min_cf`` or ``candidate_cf``); ``None`` means send the
            dense gradient (and the hook clears the residual).
        min_cf: ``theta_min``, the CF of ``g_min`` to evaluate this step.
        candidate_cf: the candidate CF to evaluate this step, ``min(theta_min * theta_s,
            theta_max)`` or the settled CF; may equal ``min_cf`` (then ``g_c`` is ``g_min``).

    When ``send_cf == candidate_cf`` the candidate tensor ``g_c`` is the one sent (its gain is
    the one :meth:`GraVACController.observe` books), also where ``candidate_cf == min_cf``.
    """

    send_cf: float | None
    min_cf: float
    candidate_cf: float


class GraVACController(ControllerCheckpointing):
    """GraVAC's compression-factor schedule (see the module docstring for the full semantics).

    Args:
        theta_min: the lowest CF, at which ``g_min`` is compressed (>= 1); default 10, or the
            first ladder entry.
        theta_max: the highest CF (>= ``theta_min``); default 1000 (exponential) or 2000
            (geometric), or the top ladder entry.
        epsilon: gain a CF needs to be sent, in (0, 1]; the paper uses 0.7 and, conservatively, 0.9.
        omega: tolerance (>= 0) of the promotion test (absolute, on gains) and of the settle test
            (relative, on throughputs).
        window: observations between two schedule updates (>= 1); default 500 (exponential) or
            2000 (geometric).
        scaling: ``'exponential'`` (``theta_s <- theta_s ** 2``) or ``'geometric'``
            (``theta_s <- 2 * theta_s``).
        ewma: weight ``beta`` of a new gain in the EWMAs, in (0, 1]; default
            ``world_size / 100`` clamped into (0, 1].
        world_size: number of ranks (>= 1); only sets the default ``ewma``.
        ladder: strictly increasing allowed CFs (each >= 1); see the module docstring.

    Raises:
        ValueError: an option is outside its range, or options do not fit together.
        TypeError: ``window`` or ``world_size`` is not an int, or a number is not a number.
    """

    def __init__(
        self,
        *,
        theta_min: float | None = None,
        theta_max: float | None = None,
        epsilon: float = 0.7,
        omega: float = 0.01,
        window: int | None = None,
        scaling: str = "exponential",
        ewma: float | None = None,
        world_size: int = 1,
        ladder: Sequence[float] | None = None,
    ) -> None:
        p = check_parameters(theta_min=theta_min, theta_max=theta_max, epsilon=epsilon, omega=omega, window=window,
                             scaling=scaling, ewma=ewma, world_size=world_size, ladder=ladder)  # fmt: skip
        self._scaling = p.scaling
        self._epsilon = p.epsilon
        self._omega = p.omega
        self._window = p.window
        self._theta_max = p.theta_max
        self._beta = p.beta
        self._ladder = p.ladder
        self._top = p.top
        # schedule state
        self._theta_min = p.theta_min
        self._min_index = p.min_index
        self._theta_s = 2.0
        self._settled: float | None = None
        self._ewma_min: float | None = None
        self._ewma_candidate: float | None = None
        self._steps = 0
        self._last_sent = 1.0
        self._tc_sum: dict[float, float] = {}
        self._tc_count: dict[float, int] = {}
        self._events: tuple[str, ...] = ()

    # ------------------------------------------------------------------ configuration
    @property
    def scaling(self) -> str:
        return self._scaling

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @property
    def omega(self) -> float:
        return self._omega

    @property
    def window(self) -> int:
        return self._window

    @property
    def theta_max(self) -> float:
        return self._theta_max

    @property
    def beta(self) -> float:
        """Weight of a new gain in the EWMAs."""
        return self._beta

    @property
    def ladder(self) -> tuple[float, ...] | None:
        return self._ladder

    # ------------------------------------------------------------------ schedule state
    @property
    def theta_min(self) -> float:
        """The current lowest CF (moves up on promotion)."""
        return self._theta_min

    @property
    def theta_s(self) -> float:
        """The scale of the candidate over ``theta_min`` (with a ladder: ``2 ** steps_above``)."""
        return self._theta_s

    @property
    def candidate_cf(self) -> float:
        """The CF the candidate is compressed to: the settled CF, or ``theta_min * theta_s`` capped."""
        if self._settled is not None:
            return self._settled
        if self._ladder is not None:
            assert self._min_index is not None
            return self._ladder[min(self._min_index + self._ladder_k(), self._top)]
        return min(self._theta_min * self._theta_s, self._theta_max)

    @property
    def settled_cf(self) -> float | None:
        return self._settled

    @property
    def gain_min(self) -> float | None:
        """EWMA of the gain at ``theta_min``; ``None`` before the first observation."""
        return self._ewma_min

    @property
    def gain_candidate(self) -> float | None:
        """EWMA of the gain at the candidate; ``None`` until the current candidate was observed."""
        return self._ewma_candidate

    @property
    def last_sent_cf(self) -> float:
        """CF sent at the last observed step; 1.0 for dense (and before the first observation)."""
        return self._last_sent

    @property
    def steps(self) -> int:
        """Observations so far."""
        return self._steps

    @property
    def throughput(self) -> dict[float, float]:
        """Mean compression throughput ``Tc`` per sent CF (1.0 is dense), by increasing CF."""
        return {cf: self._tc_sum[cf] / self._tc_count[cf] for cf in sorted(self._tc_sum)}

    @property
    def events(self) -> tuple[str, ...]:
        """Every event of the last observation, in the order they happened (empty if none)."""
        return self._events

    @property
    def last_event(self) -> str | None:
        """The most notable event of the last observation (``settle > promote > cap > scale``), or ``None``."""
        for name in EVENTS:
            if name in self._events:
                return name
        return None

    # ------------------------------------------------------------------ decisions
    def _ladder_k(self) -> int:
        return int(round(math.log2(self._theta_s)))

    def _capped(self) -> bool:
        if self._ladder is not None:
            assert self._min_index is not None
            return self._min_index + self._ladder_k() >= self._top
        return self._theta_min * self._theta_s >= self._theta_max

    def plan(self) -> Plan:
        """The decision for the coming step, from the gains observed through the previous one.

        Pure: calling it changes nothing.
        """
        candidate = self.candidate_cf
        if self._ewma_min is None:
            send: float | None = self._theta_min
        elif self._ewma_candidate is not None and self._ewma_candidate >= self._epsilon:
            send = candidate
        elif self._ewma_min >= self._epsilon:
            send = self._theta_min
        else:
            send = None
        return Plan(send_cf=send, min_cf=self._theta_min, candidate_cf=candidate)

    def observe(self, gain_min: float, gain_candidate: float, iteration_time: float, samples: float = 1.0) -> None:
        """Record one step: the gains at ``min_cf`` and ``candidate_cf`` of the step's plan.

        Args:
            gain_min: compression gain of ``g_min`` (finite; may be negative, not clamped).
            gain_candidate: compression gain of the candidate ``g_c`` (finite).
            iteration_time: seconds the step took (> 0, finite).
            samples: samples the step processed over all ranks (> 0, finite); constant
                factors cancel in the comparisons.

        Raises:
            ValueError: a value is not finite or out of range.
        """
        gain_min = _finite("gain_min", gain_min)
        gain_candidate = _finite("gain_candidate", gain_candidate)
        iteration_time = _finite("iteration_time", iteration_time)
        if iteration_time <= 0.0:
            raise ValueError(f"`iteration_time` must be > 0; got {iteration_time!r}")
        samples = _finite("samples", samples)
        if samples <= 0.0:
            raise ValueError(f"`samples` must be > 0; got {samples!r}")

        plan = self.plan()
        if plan.send_cf is None:
            sent, gain = 1.0, 1.0
        elif plan.send_cf == plan.candidate_cf:  # the candidate tensor is what goes out
            sent, gain = plan.send_cf, gain_candidate
        else:
            sent, gain = plan.send_cf, gain_min
        self._tc_sum[sent] = self._tc_sum.get(sent, 0.0) + samples / iteration_time * gain
        self._tc_count[sent] = self._tc_count.get(sent, 0) + 1
        self._last_sent = sent

        self._ewma_min = self._average(self._ewma_min, gain_min)
        self._ewma_candidate = self._average(self._ewma_candidate, gain_candidate)
        self._steps += 1
        self._events = ()
        if self._steps % self._window == 0:
            self._end_window()

    def _average(self, ewma: float | None, sample: float) -> float:
        return sample if ewma is None else (1.0 - self._beta) * ewma + self._beta * sample

    def _end_window(self) -> None:
        events: list[str] = []
        old_candidate = self.candidate_cf
        # 1. promotion
        if (
            self._ewma_min is not None
            and self._ewma_candidate is not None
            and abs(self._ewma_min - self._ewma_candidate) <= self._omega
            and old_candidate != self._theta_min
        ):
            self._theta_min = old_candidate
            if self._ladder is not None:
                self._min_index = self._ladder.index(old_candidate)
            self._ewma_min = self._ewma_candidate
            events.append("promote")
        # 2. settling
        if self._settled is None:
            eligible = sorted(
                ((-self._tc_sum[cf] / self._tc_count[cf], cf) for cf in self._tc_sum if cf >= self._theta_min),
            )
            if len(eligible) >= 2:
                (t1, cf1), (t2, cf2) = eligible[0], eligible[1]
                if abs(t1 - t2) <= self._omega * max(abs(t1), abs(t2)):
                    self._settled = min(cf1, cf2)
                    events.append("settle")
        # 3. scaling
        if self._settled is None:
            if not self._capped():
                self._theta_s = self._theta_s**2 if self._scaling == "exponential" else 2.0 * self._theta_s
            events.append("cap" if self._capped() else "scale")
        # the candidate's EWMA describes the candidate CF only
        candidate = self.candidate_cf
        if candidate == self._theta_min:
            self._ewma_candidate = self._ewma_min
        elif candidate != old_candidate:
            self._ewma_candidate = None
        self._events = tuple(events)

    def __repr__(self) -> str:
        def fmt(x: float | None) -> str:
            return "None" if x is None else f"{x:.4g}"

        return (
            f"GraVACController(steps={self._steps}, theta_min={fmt(self._theta_min)}, theta_s={fmt(self._theta_s)}, "
            f"candidate_cf={fmt(self.candidate_cf)}, settled_cf={fmt(self._settled)}, "
            f"gain_min={fmt(self._ewma_min)}, gain_candidate={fmt(self._ewma_candidate)}, "
            f"send_cf={fmt(self.plan().send_cf)}, scaling={self._scaling!r})"
        )
