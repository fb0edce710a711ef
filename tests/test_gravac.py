"""GraVACController: the CF schedule on synthetic gain streams (no tensors, no processes)."""

from __future__ import annotations

import json
import math
from typing import Callable

import pytest

from lightning_compress.gravac import GraVACController, Plan

QSGD_LADDER = [32 / 9, 32 / 5, 32 / 3, 32 / 2]  # 8, 4, 2, 1 magnitude bits + a sign bit vs fp32


def comm_time(cf: float | None) -> float:
    """A simulated step: 1 s of compute plus 100 s of dense communication divided by the CF."""
    return 1.0 + 100.0 / (1.0 if cf is None else cf)


def drive(
    c: GraVACController,
    steps: int,
    gains: Callable[[Plan], tuple[float, float]] = lambda p: (0.99, 0.9),
    time: Callable[[float | None], float] = comm_time,
) -> list[tuple[Plan, tuple[str, ...]]]:
    """Run ``steps`` steps; each gets the plan, then observes gains and the sent CF's time."""
    trace = []
    for _ in range(steps):
        plan = c.plan()
        gm, gc = gains(plan)
        c.observe(gm, gc, time(plan.send_cf), samples=64.0)
        trace.append((plan, c.events))
    return trace


def window_candidates(c: GraVACController, windows: int, **kw) -> list[float]:
    """The candidate CF after each of ``windows`` windows."""
    out = [c.candidate_cf]
    for _ in range(windows):
        drive(c, c.window, **kw)
        out.append(c.candidate_cf)
    return out


# ---------------------------------------------------------------- defaults, validation


def test_defaults_are_the_papers() -> None:
    c = GraVACController()
    assert (c.theta_min, c.theta_max, c.epsilon, c.omega, c.window, c.scaling) == (
        10.0, 1000.0, 0.7, 0.01, 500, "exponential"
    )  # fmt: skip
    assert c.beta == pytest.approx(0.01)
    assert c.theta_s == 2.0 and c.candidate_cf == 20.0
    assert c.settled_cf is None and c.gain_min is None and c.gain_candidate is None
    assert c.steps == 0 and c.last_sent_cf == 1.0 and c.throughput == {} and c.last_event is None
    g = GraVACController(scaling="geometric", world_size=8)
    assert (g.theta_max, g.window, g.beta) == (2000.0, 2000, 0.08)
    assert GraVACController(world_size=400).beta == 1.0  # clamped into (0, 1]
    assert GraVACController(ewma=0.25, world_size=8).beta == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"theta_min": 0.5}, "theta_min"),
        ({"theta_min": 100.0, "theta_max": 50.0}, "theta_max"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"omega": -0.1}, "omega"),
        ({"window": 0}, "window"),
        ({"scaling": "linear"}, "scaling"),
        ({"world_size": 0}, "world_size"),
        ({"ewma": 0.0}, "ewma"),
        ({"ewma": 1.01}, "ewma"),
        ({"ladder": [4.0, 2.0]}, "strictly increasing"),
        ({"ladder": [2.0, 2.0]}, "strictly increasing"),
        ({"ladder": [0.5, 2.0]}, ">= 1"),
        ({"ladder": []}, "at least one"),
        ({"ladder": [4.0, 8.0], "theta_max": 2.0}, "theta_max"),
        ({"theta_max": math.inf}, "theta_max"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GraVACController(**kwargs)


@pytest.mark.parametrize("kwargs", [{"window": 2.5}, {"window": True}, {"world_size": 2.0}])
def test_constructor_types(kwargs: dict) -> None:
    with pytest.raises(TypeError):
        GraVACController(**kwargs)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.9, 0.9, 0.0), "iteration_time"),
        ((0.9, 0.9, -1.0), "iteration_time"),
        ((0.9, 0.9, math.inf), "iteration_time"),
        ((0.9, 0.9, math.nan), "iteration_time"),
        ((math.nan, 0.9, 1.0), "gain_min"),
        ((0.9, math.inf, 1.0), "gain_candidate"),
        ((0.9, 0.9, 1.0, 0.0), "samples"),
    ],
)
def test_observe_validation(args: tuple, match: str) -> None:
    c = GraVACController()
    before = c.state_dict()
    with pytest.raises(ValueError, match=match):
        c.observe(*args)
    assert c.state_dict() == before  # a rejected observation changes nothing


def test_negative_gains_are_accepted_and_not_clamped() -> None:
    c = GraVACController(ewma=1.0)
    c.observe(-0.5, -2.0, 1.0)
    assert (c.gain_min, c.gain_candidate) == (-0.5, -2.0)
    assert c.plan().send_cf is None


def test_plan_is_pure() -> None:
    c = GraVACController(window=3)
    drive(c, 4)
    before = c.state_dict()
    assert c.plan() == c.plan()
    assert c.state_dict() == before


# ---------------------------------------------------------------- 1. scaling up, 2. cap


def test_exponential_scales_up_while_gain_is_high() -> None:
    # gains differ by more than omega, so theta_min is never promoted
    c = GraVACController(window=5)
    assert window_candidates(c, 5) == [20.0, 40.0, 160.0, 1000.0, 1000.0, 1000.0]
    assert c.theta_min == 10.0 and c.settled_cf is None
    assert c.theta_s == 256.0  # stops growing once the candidate is capped


def test_geometric_scales_up_while_gain_is_high() -> None:
    c = GraVACController(window=5, scaling="geometric")
    assert window_candidates(c, 4) == [20.0, 40.0, 80.0, 160.0, 320.0]
    assert c.theta_s == 32.0


def test_send_follows_the_candidate() -> None:
    c = GraVACController(window=4)
    trace = drive(c, 16)
    sent = [p.send_cf for p, _ in trace]
    # step 1: nothing observed yet -> theta_min; after each window end the new candidate's gain
    # is unknown for one step -> theta_min; otherwise the candidate
    assert sent == [10.0, 20.0, 20.0, 20.0, 10.0, 40.0, 40.0, 40.0, 10.0, 160.0, 160.0, 160.0] + [10.0] + [1000.0] * 3
    assert [p.candidate_cf for p, _ in trace] == [20.0] * 4 + [40.0] * 4 + [160.0] * 4 + [1000.0] * 4
    assert [p.min_cf for p, _ in trace] == [10.0] * 16
    assert [e for _, e in trace if e] == [("scale",), ("scale",), ("cap",), ("cap",)]
    assert c.last_sent_cf == 1000.0


def test_caps_at_theta_max() -> None:
    c = GraVACController(window=3, theta_max=100.0)
    trace = drive(c, 30)
    candidates = [p.candidate_cf for p, _ in trace]
    assert max(candidates) == 100.0 and all(cf <= 100.0 for cf in candidates)
    assert all(p.send_cf is None or p.send_cf <= 100.0 for p, _ in trace)
    events = [e for _, e in trace if e]
    assert events[:3] == [("scale",), ("cap",), ("cap",)]  # 40, then 160 -> 100
    assert all(e == ("cap",) for e in events[1:])
    assert c.theta_s == 16.0  # frozen once 10 * 16 >= 100


def test_cap_when_theta_min_equals_theta_max() -> None:
    c = GraVACController(theta_min=50.0, theta_max=50.0, window=2)
    assert c.plan() == Plan(send_cf=50.0, min_cf=50.0, candidate_cf=50.0)
    c.observe(0.9, 0.8, 1.0)
    assert c.throughput == {50.0: 0.8}  # send_cf == candidate_cf: the candidate tensor went out
    c = GraVACController(theta_min=50.0, theta_max=50.0, window=2)
    drive(c, 2)
    assert c.last_event == "cap" and c.candidate_cf == 50.0 and c.theta_s == 2.0


# ---------------------------------------------------------------- 3. fall back, EWMA lag


def test_falls_back_to_theta_min_then_dense_with_ewma_lag() -> None:
    c = GraVACController(window=1000, ewma=0.5)
    assert c.plan() == Plan(send_cf=10.0, min_cf=10.0, candidate_cf=20.0)  # nothing observed yet
    c.observe(0.9, 0.9, 2.0, samples=8.0)  # sent theta_min: Tc = 8 / 2 * 0.9
    assert (c.gain_min, c.gain_candidate) == (0.9, 0.9)  # the first observation initializes
    assert c.plan().send_cf == 20.0
    c.observe(0.9, 0.3, 4.0, samples=8.0)  # sent 20 although its gain this step is 0.3 (lag)
    assert c.gain_min == pytest.approx(0.9)
    assert c.gain_candidate == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)  # 0.6 < epsilon
    assert c.plan().send_cf == 10.0
    c.observe(0.3, 0.3, 1.0, samples=8.0)  # sent theta_min
    assert c.gain_min == pytest.approx(0.6)
    assert c.gain_candidate == pytest.approx(0.45)
    assert c.plan().send_cf is None  # both below epsilon: dense
    c.observe(0.3, 0.3, 5.0, samples=8.0)  # sent dense: CF 1.0, gain 1.0
    assert c.last_sent_cf == 1.0
    assert c.throughput == pytest.approx({1.0: 8 / 5, 10.0: (8 / 2 * 0.9 + 8 / 1 * 0.3) / 2, 20.0: 8 / 4 * 0.3})
    # recovery: theta_min comes back first, the candidate needs more high samples
    assert (c.gain_min, c.gain_candidate) == pytest.approx((0.45, 0.375))
    c.observe(0.97, 0.97, 1.0)
    assert (c.gain_min, c.gain_candidate) == pytest.approx((0.71, 0.6725))
    assert c.plan().send_cf == 10.0
    c.observe(0.97, 0.97, 1.0)
    assert (c.gain_min, c.gain_candidate) == pytest.approx((0.84, 0.82125))
    assert c.plan().send_cf == 20.0


def test_gain_exactly_epsilon_is_sent() -> None:
    c = GraVACController(ewma=1.0, epsilon=0.75)
    c.observe(0.75, 0.75, 1.0)
    assert c.plan().send_cf == 20.0


# ---------------------------------------------------------------- 4. promotion


def test_promotion_when_gains_agree_within_omega() -> None:
    c = GraVACController(window=2, ewma=1.0)
    drive(c, 2, gains=lambda p: (0.95, 0.945))
    assert c.events == ("promote", "scale") and c.last_event == "promote"
    assert c.theta_min == 20.0 and c.theta_s == 4.0 and c.candidate_cf == 80.0
    assert c.gain_min == pytest.approx(0.945)  # the promoted CF keeps its EWMA
    assert c.gain_candidate is None  # 80 was never measured
    assert c.plan() == Plan(send_cf=20.0, min_cf=20.0, candidate_cf=80.0)
    # differing by more than omega: no promotion
    drive(c, 2, gains=lambda p: (0.95, 0.9))
    assert c.events == ("scale",)
    assert c.theta_min == 20.0 and c.theta_s == 16.0 and c.candidate_cf == 320.0


def test_no_promotion_when_gains_differ_by_more_than_omega() -> None:
    c = GraVACController(window=2, ewma=1.0, omega=0.01)
    drive(c, 2, gains=lambda p: (0.95, 0.935))
    assert "promote" not in c.events and c.theta_min == 10.0


def test_promotion_walk_stops_at_theta_max() -> None:
    c = GraVACController(window=2)
    cands = []
    mins = []
    for _ in range(5):
        drive(c, 2, gains=lambda p: (0.99, 0.99))
        mins.append(c.theta_min)
        cands.append(c.candidate_cf)
    assert mins == [20.0, 80.0, 1000.0, 1000.0, 1000.0]  # never above theta_max
    assert cands == [80.0, 1000.0, 1000.0, 1000.0, 1000.0]
    assert c.plan().send_cf == 1000.0


# ---------------------------------------------------------------- 5. settling


def saturated(cf: float | None) -> float:
    """Communication hidden above CF 20: CFs 20, 40, ... run equally fast."""
    return 5.0 if cf is None or cf < 20.0 else 1.0


def test_settles_on_the_lower_cf_when_throughput_saturates() -> None:
    c = GraVACController(window=3)
    drive(c, 3, time=saturated)  # sends 10, 20, 20
    assert c.events == ("scale",) and c.candidate_cf == 40.0  # 10 vs 20 differ a lot
    drive(c, 3, time=saturated)  # sends 10, 40, 40: Tc(40) == Tc(20)
    assert c.throughput[20.0] == pytest.approx(c.throughput[40.0])
    assert c.events == ("settle",) and c.last_event == "settle"
    assert c.settled_cf == 20.0 and c.candidate_cf == 20.0
    theta_s = c.theta_s
    trace = drive(c, 12, time=saturated)
    assert c.theta_s == theta_s == 4.0  # no more scaling
    assert all(p.candidate_cf == 20.0 for p, _ in trace)
    assert [p.send_cf for p, _ in trace][1:] == [20.0] * 11  # the settled CF is sent
    assert c.settled_cf == 20.0


def test_does_not_settle_when_throughputs_differ_by_more_than_omega() -> None:
    c = GraVACController(window=3)
    drive(c, 6, time=lambda cf: 0.95 if cf == 40.0 else saturated(cf))  # Tc(40) ~5% above Tc(20)
    assert c.settled_cf is None and c.events == ("scale",) and c.candidate_cf == 160.0


def test_settle_ignores_dense_and_cfs_below_theta_min() -> None:
    # the dense CF 1.0 and theta_min = 10 have equal throughput, but only CFs >= theta_min count,
    # and 10 vs 20 differ
    c = GraVACController(window=4, ewma=1.0)
    gains = iter([(0.5, 0.5), (0.5, 0.5), (0.99, 0.9), (0.99, 0.9)])
    trace = drive(c, 4, gains=lambda p: next(gains), time=lambda cf: 0.5 if cf == 10.0 else 1.0)
    assert [p.send_cf for p, _ in trace] == [10.0, None, None, 20.0]
    assert c.throughput == pytest.approx({1.0: 64.0, 10.0: 64.0, 20.0: 57.6})
    assert c.settled_cf is None and c.events == ("scale",)


# ---------------------------------------------------------------- 6. checkpointing


def gain_at(cf: float, t: int) -> float:
    """A synthetic gain that falls with the CF and wanders over time (deterministic)."""
    return 1.0 - 0.04 * math.log2(cf) * (1.0 + 0.6 * math.sin(0.37 * t))


def feed(c: GraVACController, start: int, stop: int) -> list[Plan]:
    """Steps ``start..stop-1`` of the synthetic run; returns the plans."""
    plans = []
    for t in range(start, stop):
        plan = c.plan()
        dt = (1.0 + 0.1 * math.sin(0.05 * t) ** 2) * (1.0 + 30.0 / (plan.send_cf or 1.0))
        c.observe(gain_at(plan.min_cf, t), gain_at(plan.candidate_cf, t), dt, samples=32.0)
        plans.append(plan)
    return plans


#: configurations whose synthetic run reaches these events and sends (checked below)
RUNS = [
    ({"scaling": "exponential", "omega": 0.1}, {"promote", "scale", "cap"}),
    ({"scaling": "geometric", "omega": 0.1}, {"promote", "scale", "cap", "settle"}),
    ({"scaling": "geometric", "omega": 0.01}, {"scale", "settle"}),
]


@pytest.mark.parametrize("kwargs, expected", RUNS)
def test_synthetic_run_reaches_every_event(kwargs: dict, expected: set[str]) -> None:
    # guards the round-trip test: its runs must go through the interesting transitions
    c = GraVACController(window=5, world_size=20, **kwargs)
    seen: set[str] = set()
    sends: set[float | None] = set()
    for t in range(150):
        sends.add(feed(c, t, t + 1)[0].send_cf)
        seen.update(c.events)
    assert seen == expected
    assert None in sends or kwargs["omega"] == 0.01  # dense fallbacks
    assert len(sends) >= 4


@pytest.mark.parametrize("kwargs", [kw for kw, _ in RUNS])
@pytest.mark.parametrize("saved_at", [0, 1, 7, 10, 23, 60])
def test_state_dict_round_trip_continues_identically(kwargs: dict, saved_at: int) -> None:
    a = GraVACController(window=5, world_size=20, **kwargs)
    feed(a, 0, saved_at)
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))  # strict JSON
    b = GraVACController(window=5, world_size=20, **kwargs)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict() and repr(b) == repr(a)
    for t in range(saved_at, saved_at + 100):
        assert feed(a, t, t + 1) == feed(b, t, t + 1), t
        assert a.state_dict() == b.state_dict()
        assert a.last_event == b.last_event and a.throughput == b.throughput


def test_state_dict_holds_plain_types_only() -> None:
    c = GraVACController(window=3, ladder=QSGD_LADDER)
    feed(c, 0, 10)

    def check(x: object) -> None:
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert x is None or type(x) in (int, float, str, bool), type(x)

    check(c.state_dict())


def test_round_trip_covers_settle_and_promotion() -> None:
    a = GraVACController(window=3)
    drive(a, 6, time=saturated)
    assert a.settled_cf == 20.0
    b = GraVACController(window=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.settled_cf == 20.0 and b.candidate_cf == 20.0 and b.throughput == a.throughput
    assert drive(a, 9, time=saturated) == drive(b, 9, time=saturated)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("scaling", {"scaling": "geometric", "window": 5, "theta_max": 1000.0}),
        ("epsilon", {"epsilon": 0.9}),
        ("omega", {"omega": 0.02}),
        ("window", {"window": 6}),
        ("theta_max", {"theta_max": 900.0}),
        ("ladder", {"ladder": [10.0, 20.0, 1000.0]}),
    ],
)
def test_load_state_dict_rejects_other_config(field: str, kwargs: dict) -> None:
    a = GraVACController(window=5)
    feed(a, 0, 7)
    b = GraVACController(**{"window": 5, **kwargs})
    before = b.state_dict()
    with pytest.raises(ValueError, match=field):
        b.load_state_dict(a.state_dict())
    assert b.state_dict() == before


def test_load_state_dict_adopts_schedule_and_keeps_beta() -> None:
    a = GraVACController(window=2, world_size=4)
    drive(a, 2, gains=lambda p: (0.99, 0.99))  # promotes theta_min to 20
    b = GraVACController(window=2, world_size=8, theta_min=10.0)
    b.load_state_dict(a.state_dict())
    assert b.theta_min == 20.0 and b.beta == 0.08


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("theta_s"),
        lambda s: s.update(version=99),
        lambda s: s.update(theta_s=3.0),
        lambda s: s.update(theta_min=0.5),
        lambda s: s.update(gain_min=None),
        lambda s: s.update(steps=-1),
        lambda s: s.update(throughput=[[10.0, 1.0, 0]]),
        lambda s: s.update(events=["explode"]),
    ],
)
def test_load_state_dict_rejects_malformed_state(mutate: Callable[[dict], object]) -> None:
    a = GraVACController(window=5)
    feed(a, 0, 7)
    state = a.state_dict()
    mutate(state)
    with pytest.raises(ValueError):
        GraVACController(window=5).load_state_dict(state)


# ---------------------------------------------------------------- 7. ladder


def test_ladder_exponential_walk() -> None:
    c = GraVACController(window=2, ladder=QSGD_LADDER)
    assert (c.theta_min, c.theta_max, c.candidate_cf) == (32 / 9, 32 / 2, 32 / 5)
    assert window_candidates(c, 3, time=lambda cf: 1.0) == [32 / 5, 32 / 3, 32 / 2, 32 / 2]  # k = 1, 2, 4 (capped)
    assert c.last_event == "cap" and c.theta_s == 16.0


def test_ladder_geometric_walk() -> None:
    ladder = [2.0, 3.0, 5.0, 8.0, 13.0, 21.0]
    c = GraVACController(window=2, ladder=ladder, scaling="geometric")
    assert window_candidates(c, 5) == [3.0, 5.0, 8.0, 13.0, 21.0, 21.0]  # k = 1, 2, 3, 4, 5, 6 (capped)


def test_ladder_promotion_moves_theta_min_to_the_candidate_entry() -> None:
    c = GraVACController(window=2, ladder=QSGD_LADDER, ewma=1.0)
    drive(c, 2, gains=lambda p: (0.97, 0.965))
    assert c.events == ("promote", "cap")
    assert c.theta_min == 32 / 5 and c.candidate_cf == 32 / 2  # 2 entries above 32/5, capped at the top
    assert c.plan() == Plan(send_cf=32 / 5, min_cf=32 / 5, candidate_cf=32 / 2)
    trace = drive(c, 2, gains=lambda p: (0.9, 0.8))
    assert [p.send_cf for p, _ in trace] == [32 / 5, 32 / 2]
    assert all(cf in QSGD_LADDER for cf in c.throughput)


def test_ladder_snaps_theta_min_and_limits_theta_max() -> None:
    c = GraVACController(ladder=QSGD_LADDER, theta_min=10.0, theta_max=11.0)
    assert c.theta_min == 32 / 5 and c.candidate_cf == 32 / 3  # top usable entry <= 11
    assert GraVACController(ladder=[4.0, 8.0], theta_min=1.0).theta_min == 4.0
    c = GraVACController(ladder=QSGD_LADDER, theta_max=11.0, window=1)
    drive(c, 5)
    assert c.candidate_cf == 32 / 3 and c.last_event == "cap"


# ---------------------------------------------------------------- 8. determinism


def test_two_controllers_fed_the_same_stream_agree() -> None:
    for kwargs in ({"window": 4}, {"window": 3, "scaling": "geometric"}, {"window": 2, "ladder": QSGD_LADDER}):
        a, b = GraVACController(**kwargs), GraVACController(**kwargs)
        assert feed(a, 0, 200) == feed(b, 0, 200)
        assert a.state_dict() == b.state_dict()


def test_repr_shows_state() -> None:
    c = GraVACController(window=2)
    drive(c, 2)
    text = repr(c)
    assert text.startswith("GraVACController(") and "steps=2" in text and "candidate_cf=40" in text
