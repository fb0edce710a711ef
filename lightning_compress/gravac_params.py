"""GraVAC's parameters: their ranges, their defaults, and the checks a saved state's numbers get."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

__all__ = ["EVENTS", "SCALINGS", "Parameters", "check_parameters"]

SCALINGS = ("exponential", "geometric")
#: window-end events, most notable first (``last_event`` reports the first that occurred)
EVENTS = ("settle", "promote", "cap", "scale")

_DEFAULT_THETA_MAX = {"exponential": 1000.0, "geometric": 2000.0}
_DEFAULT_WINDOW = {"exponential": 500, "geometric": 2000}


def _finite(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be finite; got {number!r}")
    return number


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value!r}")
    return value


class Parameters(NamedTuple):
    """A controller's checked parameters, defaults filled in."""

    scaling: str
    epsilon: float
    omega: float
    window: int
    theta_max: float
    beta: float
    ladder: tuple[float, ...] | None
    top: int  # index of the highest ladder entry <= theta_max (0 without a ladder)
    theta_min: float  # a ladder entry when there is a ladder
    min_index: int | None  # theta_min's ladder index


def check_parameters(
    *,
    theta_min: float | None,
    theta_max: float | None,
    epsilon: float,
    omega: float,
    window: int | None,
    scaling: str,
    ewma: float | None,
    world_size: int,
    ladder: Sequence[float] | None,
) -> Parameters:
    """The parameters of :class:`~lightning_compress.gravac.GraVACController`, checked, with defaults filled in.

    Raises:
        ValueError: an option is outside its range, or options do not fit together.
        TypeError: ``window`` or ``world_size`` is not an int, or a number is not a number.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"`scaling` must be one of {SCALINGS}; got {scaling!r}")
    epsilon = _finite("epsilon", epsilon)
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"`epsilon` is the gain a CF needs and must be in (0, 1]; got {epsilon!r}")
    omega = _finite("omega", omega)
    if omega < 0.0:
        raise ValueError(f"`omega` is a tolerance and must be >= 0; got {omega!r}")
    window = _integer("window", _DEFAULT_WINDOW[scaling] if window is None else window, 1)
    world_size = _integer("world_size", world_size, 1)
    if ewma is None:
        beta = min(1.0, world_size / 100.0)
    else:
        beta = _finite("ewma", ewma)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"`ewma` is the weight of a new sample and must be in (0, 1]; got {beta!r}")

    steps: tuple[float, ...] | None = None
    if ladder is not None:
        steps = tuple(_finite("ladder entry", x) for x in ladder)
        if not steps:
            raise ValueError("`ladder` must hold at least one CF")
        if steps[0] < 1.0:
            raise ValueError(f"`ladder` entries are CFs and must be >= 1; got {steps[0]!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"`ladder` must be strictly increasing; got {list(steps)!r}")

    if theta_min is None:
        theta_min = steps[0] if steps is not None else 10.0
    theta_min = _finite("theta_min", theta_min)
    if theta_min < 1.0:
        raise ValueError(f"`theta_min` is a CF and must be >= 1; got {theta_min!r}")
    if theta_max is None:
        theta_max = steps[-1] if steps is not None else _DEFAULT_THETA_MAX[scaling]
    theta_max = _finite("theta_max", theta_max)

    min_index: int | None = None
    top = 0
    if steps is not None:
        below = [i for i, x in enumerate(steps) if x <= theta_min]
        min_index = below[-1] if below else 0
        theta_min = steps[min_index]
        usable = [i for i, x in enumerate(steps) if x <= theta_max]
        top = usable[-1] if usable else -1
    if theta_max < theta_min or top < (min_index or 0):
        raise ValueError(f"`theta_max` must be >= `theta_min` ({theta_min!r}); got {theta_max!r}")
    return Parameters(scaling, epsilon, omega, window, theta_max, beta, steps, top, theta_min, min_index)
