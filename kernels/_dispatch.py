"""Which implementation of an op runs for a tensor: Triton, the compiled CPU path, or torch.

``LIGHTNING_COMPRESS_KERNELS`` forces a path (tests, benchmarks):

* ``auto`` (default): CUDA tensors use Triton when it imports, CPU tensors use the
  compiled CPU path (:mod:`kernels.cpu`) when it builds; otherwise the torch twin.
* ``triton``: Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``.
* ``cpu``: the compiled CPU path (an error for CUDA tensors or when it cannot build).
* ``torch``: the pure-torch twins, the reference meaning of every op.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["ENV_VAR", "PATHS", "path_for", "triton_available", "triton_interpreting"]

ENV_VAR = "LIGHTNING_COMPRESS_KERNELS"
PATHS = ("auto", "triton", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports (it may still be unable to run on this machine)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in the interpreter, on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _requested() -> str:
    path = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {PATHS}; got {path!r}")
    return path


def path_for(tensor: torch.Tensor) -> str:
    """The path (``"triton"``, ``"cpu"`` or ``"torch"``) that ops on ``tensor`` take now."""
    from kernels import cpu  # late: building the CPU library is lazy

    path = _requested()
    if path == "auto":
        if tensor.is_cuda:
            return "triton" if triton_available() else "torch"
        if tensor.device.type == "cpu" and cpu.available():
            return "cpu"
        return "torch"
    if path == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton does not import")
        if not tensor.is_cuda and not triton_interpreting():
            raise RuntimeError(f"{ENV_VAR}=triton on a {tensor.device.type} tensor needs TRITON_INTERPRET=1")
    if path == "cpu":
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{ENV_VAR}=cpu but the tensor is on {tensor.device}")
        if not cpu.available():
            raise RuntimeError(f"{ENV_VAR}=cpu but the CPU library could not be built: {cpu.build_error()}")
    return path
