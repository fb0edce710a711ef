"""What a :class:`~lightning_compress.state.CompressionState` and an adaptive controller know of each other.

The state holds the run attached to it (:class:`AdaptiveLink`, GraVAC's
:class:`~lightning_compress.adaptive.AdaptiveRun`), calls its :meth:`~AdaptiveLink.finish_step` at the end of
every step, and saves and restores its controller's state (:class:`ControllerState`) with its own. A run
is attached with :meth:`CompressionState.attach_adaptive
<lightning_compress.state.CompressionState.attach_adaptive>`, which hands the run's controller a state a
checkpoint brought before the controller existed. Neither side touches the other's private fields.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

__all__ = ["AdaptiveLink", "ControllerState"]


class ControllerState(Protocol):
    """The controller as the state sees it: its factor, and its state in checkpoints."""

    @property
    def last_sent_cf(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class AdaptiveLink(Protocol):
    """An adaptive run attached to a state: its controller, and the end of each step."""

    @property
    def controller(self) -> ControllerState: ...

    def finish_step(self, state: Any) -> None: ...
