"""Saving and restoring a :class:`~lightning_compress.gravac.GraVACController`'s schedule (JSON-able states)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from lightning_compress.gravac_params import EVENTS, _finite, _integer

__all__ = ["ControllerCheckpointing"]

_STATE_VERSION = 1
#: configuration a restored state must agree with (``beta`` follows the current world size)
_CHECKED_CONFIG = ("scaling", "epsilon", "omega", "window", "theta_max", "ladder")


class ControllerCheckpointing:
    """The checkpoint half of :class:`~lightning_compress.gravac.GraVACController` (a base class of it)."""

    def _config(self) -> dict[str, Any]:
        return {
            "scaling": self._scaling,
            "epsilon": self._epsilon,
            "omega": self._omega,
            "window": self._window,
            "theta_max": self._theta_max,
            "ladder": None if self._ladder is None else list(self._ladder),
            "beta": self._beta,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a fresh controller needs to continue with the same plans; JSON-able."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "theta_min": self._theta_min,
            "theta_s": self._theta_s,
            "settled_cf": self._settled,
            "gain_min": self._ewma_min,
            "gain_candidate": self._ewma_candidate,
            "steps": self._steps,
            "last_sent_cf": self._last_sent,
            "throughput": [[cf, self._tc_sum[cf], self._tc_count[cf]] for cf in sorted(self._tc_sum)],
            "events": list(self._events),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt a saved schedule state (``theta_min``, ``theta_s``, EWMAs, throughputs, ...).

        The saved ``scaling``, ``epsilon``, ``omega``, ``window``, ``theta_max`` and ``ladder``
        must equal this controller's; the EWMA weight ``beta`` stays this controller's (it
        follows the current world size). Nothing changes if the state is rejected.

        Raises:
            ValueError: the state is malformed, or its configuration differs (the message
                names the field).
        """
        try:
            version = state["version"]
            config = state["config"]
            if version != _STATE_VERSION:
                raise ValueError(f"GraVAC state version {version!r} is not supported (expected {_STATE_VERSION})")
            mine = self._config()
            for name in _CHECKED_CONFIG:
                saved = config[name]
                if name == "ladder" and saved is not None:
                    saved = [float(x) for x in saved]
                if saved != mine[name]:
                    raise ValueError(
                        f"GraVAC state was saved with {name}={saved!r} but this controller has {name}={mine[name]!r}"
                    )
            theta_min = _finite("theta_min", state["theta_min"])
            theta_s = _finite("theta_s", state["theta_s"])
            settled, ewma_min, ewma_candidate = (
                None if state[key] is None else _finite(key, state[key])
                for key in ("settled_cf", "gain_min", "gain_candidate")
            )
            steps = _integer("steps", state["steps"], 0)
            last_sent = _finite("last_sent_cf", state["last_sent_cf"])
            tc_sum: dict[float, float] = {}
            tc_count: dict[float, int] = {}
            for cf, total, count in state["throughput"]:
                cf = _finite("throughput CF", cf)
                tc_sum[cf] = _finite("throughput sum", total)
                tc_count[cf] = _integer("throughput count", count, 1)
            events = tuple(str(e) for e in state["events"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed GraVAC state: {err!r}") from None

        if not 1.0 <= theta_min <= self._theta_max:
            raise ValueError(f"GraVAC state has theta_min={theta_min!r} outside [1, theta_max={self._theta_max!r}]")
        if theta_s < 2.0 or math.log2(theta_s) != round(math.log2(theta_s)):
            raise ValueError(f"GraVAC state has theta_s={theta_s!r}, not a power of two >= 2")
        if settled is not None and not theta_min <= settled <= self._theta_max:
            raise ValueError(f"GraVAC state has settled_cf={settled!r} outside [theta_min, theta_max]")
        if last_sent < 1.0 or any(cf < 1.0 for cf in tc_sum):
            raise ValueError("GraVAC state has a CF below 1")
        if steps > 0 and ewma_min is None:
            raise ValueError("GraVAC state has observations but no gain_min EWMA")
        if any(e not in EVENTS for e in events):
            raise ValueError(f"GraVAC state has unknown events {events!r}")
        min_index = None
        if self._ladder is not None:
            if theta_min not in self._ladder or (settled is not None and settled not in self._ladder):
                raise ValueError(f"GraVAC state has CFs that are not ladder entries: {theta_min!r}, {settled!r}")
            min_index = self._ladder.index(theta_min)

        self._theta_min = theta_min
        self._min_index = min_index
        self._theta_s = theta_s
        self._settled = settled
        self._ewma_min = ewma_min
        self._ewma_candidate = ewma_candidate
        self._steps = steps
        self._last_sent = last_sent
        self._tc_sum = tc_sum
        self._tc_count = tc_count
        self._events = events
