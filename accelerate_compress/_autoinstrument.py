"""Enable compression inside ``Accelerator.prepare_model`` when ``ACCELERATE_COMPRESSION`` is set."""

from __future__ import annotations

import functools
import logging
from typing import Any

from accelerate_compress.flag import adaptive_from_env, config_from_env

__all__ = ["install"]

log = logging.getLogger(__name__)


def install() -> bool:
    """Patch ``accelerate.Accelerator.prepare_model`` once; ``False`` when the flag is unset (nothing patched)."""
    config = config_from_env()  # invalid settings fail here, before the training script runs
    if config is None:
        return False
    adaptive = adaptive_from_env()
    from accelerate import Accelerator

    # now: the script's folder replaces sys.path[0] later
    from accelerate_compress.adapter import _ENABLED, attach_prepared_optimizer, enable

    original = Accelerator.prepare_model
    if getattr(original, "_accelerate_compress", False):
        return True

    @functools.wraps(original)
    def prepare_model(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        prepared = original(self, model, *args, **kwargs)
        if not kwargs.get("evaluation_mode", False):
            enable(self, prepared, config, adaptive="none" if adaptive is None else adaptive)
        return prepared

    prepare_model._accelerate_compress = True  # type: ignore[attr-defined]
    Accelerator.prepare_model = prepare_model

    # prepare() takes models before optimizers: once an optimizer is prepared, its momentum can move.
    original_optimizer = Accelerator.prepare_optimizer

    @functools.wraps(original_optimizer)
    def prepare_optimizer(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        prepared = original_optimizer(self, optimizer, *args, **kwargs)
        for state in _ENABLED:
            attach_prepared_optimizer(self, state)
        return prepared

    Accelerator.prepare_optimizer = prepare_optimizer
    log.debug("accelerate_compress: Accelerator.prepare_model instrumented (%s)", config)
    return True
