"""The CPU path: the C functions of ``cpu_ops.c``, built on first use and called via ctypes.

The library is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) for the native CPU and cached in ``$LIGHTNING_COMPRESS_CACHE`` (default
``~/.cache/lightning_compress``) under a key of the source, the flags, the compiler version
and the CPU target, so nodes that share a home directory never load each other's builds.
A cached file is loaded only after its owner, mode, size and sha256 are checked, and
processes that start together build it once (see :mod:`lightning_compress_kernels._build_plan`
and :mod:`lightning_compress_kernels._build`). :func:`prepare` builds it ahead of the first
step. If it cannot be built or loaded, :func:`available` is False, :func:`build_error` says
why, one ``RuntimeWarning`` says how to fix or silence it, and the ops use their torch twins.

Large tensors are cut into one range per torch intra-op thread; ctypes releases the GIL,
so the ranges run in parallel. The wrappers here take already-checked arguments (see the
public ops in :mod:`lightning_compress_kernels.sign`, :mod:`lightning_compress_kernels.qsgd`, :mod:`lightning_compress_kernels.topk`).
This module holds the library, the thread pool and the ops on one tensor; the ops on a whole
bucket of tensors in one call are in :mod:`lightning_compress_kernels.cpu_multi`.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import _build
from ._blocks import num_blocks
from ._dispatch import ENV_VAR, library_wanted
from .rng import stream_keys

__all__ = ["available", "build_error", "library_path", "prepare"]

_SOURCE = Path(__file__).with_name("cpu_ops.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
_NATIVE = ["-march=native"]
_PARALLEL_MIN = 1 << 18  # elements below which one thread does the whole tensor

_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    "lc_sign_ef": [_P, _P, _P, _P, _P, _P, _I, _I, _F, _I, _I],
    "lc_sign_decode_add": [_P, _P, _I, _P, _I, _I, _I, _I, _I],
    "lc_qsgd_encode": [_P, _P, _P, _P, _I, _I, _I, ctypes.c_uint32, ctypes.c_uint32, _I, _I],
    "lc_qsgd_decode_add": [_P, _P, _P, _I, _P, _I, _I, _I, _I, _I],
    "lc_sign_server": [_P, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I],
    "lc_add": [_P, _P, _P, _I, _I],
    "lc_all_finite": [_P, _I, _I],
    "lc_select": [_P, _F, _I, _I, _P, _P, _P],
    "lc_velocity": [_P, _P, _P, _P, _P, _F, _F, _F, _F, _F, _F, _F, _I, _I, _I],
    # multi-tensor ops (cpu_multi.py): one call per bucket
    "lc_sign_ef_multi": [_P, _I, _F, _P, _P, _I, _I],
    "lc_sign_decode_multi": [_P, _I, _P, _I, _I, _I, _I],
    "lc_topk_threshold": [_P, _F, _P, _I, _I],
    "lc_topk_pass": [_P, _P, _F, _P, _I, _I],
    "lc_sign_ef_velocity_multi": [_P, _I, _P, _P, _P, _I, _I],
    "lc_topk_finish": [_P, _P, _I, _I, _I],
    "lc_sparse_decode_multi": [_P, _P, _I, _I, _I, _I],
}

_LIBRARY = _build.CLibrary(
    "cpu_ops",
    _SOURCE,
    _FLAGS,
    variants=(_NATIVE, []),  # this CPU's instructions; else the compiler's default target
    signatures=_SIGNATURES,
    restypes={"lc_all_finite": ctypes.c_int64, "lc_sparse_decode_multi": ctypes.c_int64},
    libraries=["-lm"],
    hint=(
        "CPU tensors use the torch twins of the ops, which are tens of times slower. Set CC to a working "
        f"C compiler to use the C path, or set {ENV_VAR}=torch to use the twins without this warning."
    ),
)


def _library() -> ctypes.CDLL | None:
    return _LIBRARY.get()


def available() -> bool:
    """The CPU library is loaded (building it now if needed)."""
    return _library() is not None


def build_error() -> str | None:
    """Why the library could not be built or loaded, if it could not."""
    _library()
    return _LIBRARY.error


def library_path() -> str | None:
    """File of the loaded library."""
    _library()
    return _LIBRARY.path


def prepare() -> bool:
    """Build (or load) the CPU library now, so that the first compressed step does not wait for the compiler.

    Call it where compression is set up, on every rank: the first build takes seconds and
    happens once per machine, CPU and compiler; later starts check and load the cached file.
    Ranks that call it at once build once, the others wait for that build. Nothing is built
    when ``LIGHTNING_COMPRESS_KERNELS`` is ``torch`` or ``triton``, since the ops then do not
    use the library.

    Returns:
        True if ops on CPU tensors run in the C library; False if they use the torch twins
        (:func:`build_error` then says why, and a ``RuntimeWarning`` was issued once).

    Example:
        >>> isinstance(prepare(), bool)
        True
    """
    if not library_wanted():
        return False
    return available()


def _executor(workers: int) -> ThreadPoolExecutor:
    # A forked child inherits the pool object but not its threads: make a new one per process.
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[0] != pid or _pool[1] < workers:
        _pool = (pid, workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning-compress"))
    return _pool[2]


def _ranges(count: int, numel: int) -> list[tuple[int, int]]:
    workers = min(torch.get_num_threads(), count)
    if numel < _PARALLEL_MIN or workers <= 1:
        return [(0, count)]
    step = -(-count // workers)
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)]


def _run(fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    for future in [_executor(len(ranges)).submit(fn, lo, hi) for lo, hi in ranges]:
        future.result()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ptrs(ts: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts))


def _contig(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


# ----- ops -------------------------------------------------------------------------------
def sign_ef(x, residual, block, residual_out, scale=1.0):
    n = x.numel()
    nb = num_blocks(n, block)
    scales, sq = torch.empty(nb), torch.empty(nb)
    packed = torch.empty(-(-n // 8), dtype=torch.uint8)
    fn = _library().lc_sign_ef
    args = (_ptr(x), _ptr(residual), _ptr(residual_out), _ptr(scales), _ptr(sq), _ptr(packed), n, block, scale)
    _run(lambda lo, hi: fn(*args, lo, hi), _ranges(nb, n))
    return scales, packed, sq


def sign_decode_add(scales, packed, out, block, assign=False):
    n = out.numel()
    scales, packed = _contig(scales), _contig(packed)
    ps, pp = _ptrs(scales), _ptrs(packed)
    fn = _library().lc_sign_decode_add
    r, a = len(scales), int(assign)
    _run(lambda lo, hi: fn(ps, pp, r, _ptr(out), n, block, a, lo, hi), _ranges(num_blocks(n, block), n))
    return out


def sign_server_step(scales, packed, server_error, block, server_error_out):
    n = server_error.numel()
    nb = num_blocks(n, block)
    scales, packed = _contig(scales), _contig(packed)
    ps, pp = _ptrs(scales), _ptrs(packed)
    scales_out, sq = torch.empty(nb), torch.empty(nb)
    packed_out = torch.empty(-(-n // 8), dtype=torch.uint8)
    lib = _library()
    args = (ps, pp, len(scales), _ptr(server_error), _ptr(server_error_out), _ptr(scales_out), _ptr(sq), _ptr(packed_out))
    _run(lambda lo, hi: lib.lc_sign_server(*args, n, block, lo, hi), _ranges(nb, n))
    return scales_out, packed_out, sq


def qsgd_encode(x, bits, block, seed):
    n = x.numel()
    nb = num_blocks(n, block)
    norms = torch.empty(nb)
    signs = torch.empty(-(-n // 8), dtype=torch.uint8)
    codes = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    k0, k1 = stream_keys(seed)
    lib = _library()
    args = (_ptr(x), _ptr(norms), _ptr(signs), _ptr(codes), n, block, bits, k0, k1)
    _run(lambda lo, hi: lib.lc_qsgd_encode(*args, lo, hi), _ranges(nb, n))
    return norms, signs, codes


def qsgd_decode_add(norms, signs, codes, out, bits, block):
    n = out.numel()
    norms, signs, codes = _contig(norms), _contig(signs), _contig(codes)
    pn, ps, pc = _ptrs(norms), _ptrs(signs), _ptrs(codes)
    lib = _library()
    args = (pn, ps, pc, len(norms), _ptr(out), n, block, bits)
    _run(lambda lo, hi: lib.lc_qsgd_decode_add(*args, lo, hi), _ranges(num_blocks(n, block), n))
    return out


def add(x, residual, v_out):
    lib = _library()
    _run(lambda lo, hi: lib.lc_add(_ptr(x), _ptr(residual), _ptr(v_out), lo, hi), _ranges(x.numel(), x.numel()))
    return v_out


def select_at_least(v, threshold):
    n = v.numel()
    lib = _library()
    ranges = _ranges(n, n)
    counts = [ctypes.c_int64() for _ in ranges]
    sqs = [ctypes.c_float() for _ in ranges]

    def count(j: int) -> None:
        lo, hi = ranges[j]
        lib.lc_select(_ptr(v), threshold, lo, hi, None, ctypes.byref(counts[j]), ctypes.byref(sqs[j]))

    _run(lambda lo, hi: [count(j) for j in range(lo, hi)], _ranges(len(ranges), n))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c.value)
    idx = torch.empty(offsets[-1], dtype=torch.int64)

    def compact(j: int) -> None:
        lo, hi = ranges[j]
        if counts[j].value == 0:  # nothing to write (and an empty tensor may have a null pointer)
            return
        # Counts the same entries again into this range's own counter (no sum of squares).
        lib.lc_select(_ptr(v), threshold, lo, hi, idx.data_ptr() + 8 * offsets[j], ctypes.byref(counts[j]), None)

    _run(lambda lo, hi: [compact(j) for j in range(lo, hi)], _ranges(len(ranges), n))
    sq = torch.tensor(0.0)
    for s in sqs:  # fixed order: the same sum for the same ranges
        sq += s.value
    return idx, sq


def all_finite(x):
    lib = _library()
    ranges = _ranges(x.numel(), x.numel())
    results = [1] * len(ranges)

    def check(j: int) -> None:
        results[j] = lib.lc_all_finite(_ptr(x), *ranges[j])

    _run(lambda lo, hi: [check(j) for j in range(lo, hi)], _ranges(len(ranges), x.numel()))
    return all(results)


def velocity(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead):
    fn = _library().lc_velocity
    args = (_ptr(g), _ptr(p), _ptr(u_old), _ptr(u_out), _ptr(s_out), xs, wds, m, a0, a1, c, post, int(lookahead))
    _run(lambda lo, hi: fn(*args, lo, hi), _ranges(g.numel(), g.numel()))
