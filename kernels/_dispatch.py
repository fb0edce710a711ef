"""Which implementation of an op runs: the Triton kernels, the C library, or the torch twin.

This module alone makes the choice. An op asks :func:`implementation` for the module that
runs it (``kernels.cpu`` or ``kernels.cpu_multi``, its Triton module, or ``None`` for its
torch twin), saying which compiled kernels it has and whether its tensors' layout fits them;
:func:`choose` gives the same choice with the reason. The device of the tensor and
``LIGHTNING_COMPRESS_KERNELS`` (tests, benchmarks) decide the rest:

* ``auto`` (default): CUDA tensors use Triton when it imports, CPU tensors use the
  compiled CPU path (:mod:`lightning_compress_kernels.cpu`) when it builds; otherwise the torch twin.
* ``triton``: Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``.
* ``cpu``: the compiled CPU path (an error for CUDA tensors or when it cannot build).
* ``torch``: the pure-torch twins, the reference meaning of every op.

A forced path that cannot run raises a ``RuntimeError`` that says why (:func:`unavailable`).
An op without a kernel on the chosen path, or whose tensors that kernel does not take, runs
its twin. Ops that take any dtype but whose C kernel reads only contiguous fp32 (the
finiteness check, the velocity) look at that before they ask, so other inputs never consult
the setting.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable, Collection, NamedTuple

import torch

__all__ = [
    "ENV_VAR", "PATHS", "Choice", "choose", "implementation", "path_for", "unavailable", "library_wanted",
    "triton_available", "triton_interpreting",
]  # fmt: skip

ENV_VAR = "LIGHTNING_COMPRESS_KERNELS"
PATHS = ("auto", "triton", "cpu", "torch")

_NAMES = {"triton": "Triton", "cpu": "C"}
# (path, reason) pairs of the usual choices, made once: the choice is made on every op call.
_FORCED = {path: (path, f"{ENV_VAR}={path}") for path in PATHS[1:]}
_AUTO = {"triton": ("triton", f"{ENV_VAR}=auto and a CUDA tensor"), "cpu": ("cpu", f"{ENV_VAR}=auto and a CPU tensor")}


class Choice(NamedTuple):
    """The path an op takes on a tensor, and why."""

    path: str  # "triton", "cpu" or "torch"
    reason: str  # what selected the path, or what ruled out the compiled one


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything else
        return f"{type(err).__name__}: {err}"
    return None


def triton_available() -> bool:
    """Triton imports (it may still be unable to run on this machine)."""
    return _triton_import_error() is None


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in the interpreter, on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _setting() -> str:
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


def _requested() -> str:
    path = _setting()
    if path not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {PATHS}; got {path!r}")
    return path


def library_wanted() -> bool:
    """Ops may use the C library: the setting does not force ``torch`` or ``triton`` (not validated here)."""
    return _setting() not in ("torch", "triton")


_cpu_module: ModuleType | None = None


def _cpu() -> ModuleType:
    global _cpu_module
    if _cpu_module is None:
        from . import cpu  # late: kernels.cpu imports this module, and building the library is lazy

        _cpu_module = cpu
    return _cpu_module


def unavailable(path: str, tensor: torch.Tensor) -> str | None:
    """Why ``path`` (``"triton"``, ``"cpu"`` or ``"torch"``) cannot run ops on ``tensor`` here; None if it can.

    Asking about ``"cpu"`` for a CPU tensor builds (or loads) the C library.
    """
    if path not in PATHS[1:]:
        raise ValueError(f"`path` must be one of {PATHS[1:]}; got {path!r}")
    return _unavailable(path, tensor.device)


def _unavailable(path: str, device: torch.device) -> str | None:
    if path == "cpu":
        if device.type != "cpu":
            return f"the tensor is on {device}"
        cpu = _cpu()
        if not cpu.available():
            return f"the CPU library could not be built: {cpu.build_error()}"
        return None
    if path == "triton":
        error = _triton_import_error()
        if error is not None:
            return f"triton does not import ({error})"
        if device.type != "cuda" and not triton_interpreting():
            return f"a {device.type} tensor needs TRITON_INTERPRET=1"
    return None


def _environment(tensor: torch.Tensor) -> tuple[str, str]:
    """``(path, reason)`` that the setting and the device give, before what the op has is considered."""
    path = _requested()
    if path == "torch":
        return _FORCED["torch"]
    device = tensor.device
    if path == "auto":
        compiled = "triton" if device.type == "cuda" else "cpu"
        why = _unavailable(compiled, device)
        if why is None:
            return _AUTO[compiled]
        return "torch", f"the {_NAMES[compiled]} path is unavailable: {why}"
    why = _unavailable(path, device)
    if why is not None:
        raise RuntimeError(f"{ENV_VAR}={path} but {why}")
    return _FORCED[path]


def _decide(tensor: torch.Tensor, has_triton: bool, has_cpu: bool, fits) -> tuple[str, str]:
    """``(path, reason)``: :func:`choose` without building a :class:`Choice`."""
    chosen = _environment(tensor)
    path = chosen[0]
    if path == "torch":
        return chosen
    if not (has_triton if path == "triton" else has_cpu):
        return "torch", f"the op has no {_NAMES[path]} kernel"
    if not (fits() if callable(fits) else fits):
        return "torch", f"the op's {_NAMES[path]} kernel does not take these tensors' layout"
    return chosen


def choose(
    tensor: torch.Tensor,
    *,
    paths: Collection[str] = ("triton", "cpu"),
    fits: bool | Callable[[], bool] = True,
) -> Choice:
    """The path an op runs on ``tensor``, and why.

    Args:
        tensor: the tensor whose device decides (the op's input, or its output for decoders).
        paths: the compiled paths the op has kernels for; on any other it runs its twin.
        fits: whether those kernels take the op's tensors as they are laid out; a callable is
            called only when a compiled path would otherwise run.

    Raises:
        ValueError: ``LIGHTNING_COMPRESS_KERNELS`` is not one of :data:`PATHS`.
        RuntimeError: it forces a path that cannot run on ``tensor`` here.

    Example:
        >>> choose(torch.zeros(4), fits=False).path  # tensors the kernels do not take: the twin
        'torch'
    """
    return Choice(*_decide(tensor, "triton" in paths, "cpu" in paths, fits))


def path_for(tensor: torch.Tensor) -> str:
    """The path (``"triton"``, ``"cpu"`` or ``"torch"``) that ops with both compiled kernels take on ``tensor`` now."""
    return _environment(tensor)[0]


def implementation(
    tensor: torch.Tensor,
    *,
    triton: str | None = None,
    cpu: str | None = "cpu",
    fits: bool | Callable[[], bool] = True,
) -> ModuleType | None:
    """The module whose function of the op's name runs it on ``tensor``, or None: run the torch twin.

    Args:
        tensor: as for :func:`choose`.
        triton: the ``kernels`` module holding the op's Triton kernel (``"triton_sign"``), if any.
        cpu: the ``kernels`` module holding the op's C kernel (:mod:`lightning_compress_kernels.cpu`,
            or :mod:`lightning_compress_kernels.cpu_multi` for the ops on many tensors), if any.
        fits: as for :func:`choose`.

    Returns:
        The C module, the Triton module (imported now), or None.
    """
    path = _decide(tensor, triton is not None, cpu is not None, fits)[0]
    if path == "cpu":
        return _cpu() if cpu == "cpu" else importlib.import_module(f".{cpu}", __package__)
    if path == "triton":
        return importlib.import_module(f".{triton}", __package__)
    return None
