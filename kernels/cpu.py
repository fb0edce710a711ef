"""The CPU path: the C functions of ``cpu_ops.c``, built on first use and called via ctypes.

The library is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) for the native CPU and cached in ``$LIGHTNING_COMPRESS_CACHE`` (default
``~/.cache/lightning_compress``) under a key of the source, the flags, the compiler version
and the CPU target, so nodes that share a home directory never load each other's builds.
A cached file is loaded only after its owner, mode, size and sha256 are checked, and
processes that start together build it once (see :mod:`lightning_compress_kernels._build`). :func:`prepare`
builds it ahead of the first step. If it cannot be built or loaded, :func:`available` is
False, :func:`build_error` says why, one ``RuntimeWarning`` says how to fix or silence it,
and the ops use their torch twins.

Large tensors are cut into one range per torch intra-op thread; ctypes releases the GIL,
so the ranges run in parallel. The wrappers here take already-checked arguments (see the
public ops in :mod:`lightning_compress_kernels.sign`, :mod:`lightning_compress_kernels.qsgd`, :mod:`lightning_compress_kernels.topk`).
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
    # multi-tensor ops: one call per bucket
    "lc_sign_ef_multi": [_P, _I, _F, _P, _P, _I, _I],
    "lc_sign_decode_multi": [_P, _I, _P, _I, _I, _I, _I],
    "lc_topk_threshold": [_P, _F, _P, _I, _I],
    "lc_topk_pass": [_P, _P, _F, _P, _I, _I],
    "lc_sign_ef_velocity_multi": [_P, _I, _P, _P, _P, _I, _I],
    "lc_topk_finish": [_P, _P, _I, _I, _I],
    "lc_sparse_decode_multi": [_P, _P, _I, _I, _I, _I],
    "lc_velocity": [_P, _P, _P, _P, _P, _F, _F, _F, _F, _F, _F, _F, _I, _I, _I],
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


# ----- multi-tensor ops -------------------------------------------------------------------
class _SignSeg(ctypes.Structure):
    _fields_ = [("x", _P), ("e", _P), ("r", _P), ("payload", _P), ("n", _I), ("block", _I), ("first_block", _I)]


class _SignDSeg(ctypes.Structure):
    _fields_ = [("out", _P), ("n", _I), ("block", _I), ("first_block", _I), ("offset", _I)]


class _TopKJob(ctypes.Structure):
    _fields_ = [
        ("x", _P), ("e", _P), ("r", _P), ("n", _I), ("k", _I), ("sample_size", _I), ("sample_rank", _I),
        ("k0", ctypes.c_uint32), ("k1", ctypes.c_uint32), ("values", _P), ("idx", _P),
        ("threshold", ctypes.c_float), ("sq", ctypes.c_float), ("kept_sq", ctypes.c_float), ("status", _I),
        ("p", _P), ("u_old", _P), ("u_out", _P),
    ]  # fmt: skip


class _VParams(ctypes.Structure):
    _fields_ = [("xs", _F), ("wds", _F), ("m", _F), ("a0", _F), ("a1", _F), ("c", _F), ("post", _F), ("look", _I)]


class _SignVSeg(ctypes.Structure):
    _fields_ = [
        ("x", _P), ("p", _P), ("u_old", _P), ("u_out", _P), ("e", _P), ("r", _P), ("payload", _P),
        ("n", _I), ("block", _I), ("first_block", _I),
    ]  # fmt: skip


def _vparams(v) -> _VParams | None:
    if v is None:
        return None
    return _VParams(v.xs, v.wds, v.m, v.a0, v.a1, v.c, v.post, int(v.lookahead))


class _TopKChunk(ctypes.Structure):
    _fields_ = [
        ("job", _I), ("i0", _I), ("i1", _I), ("cand", _P), ("cval", _P), ("cap", _I), ("count", _I), ("sq", _F),
    ]  # fmt: skip


class _SparseDSeg(ctypes.Structure):
    _fields_ = [("out", _P), ("n", _I), ("k", _I), ("offset", _I)]


def _split_even(count: int, parts: int) -> list[tuple[int, int]]:
    step = -(-count // max(parts, 1))
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)] or [(0, 0)]


def _workers(numel: int) -> int:
    return 1 if numel < _PARALLEL_MIN else max(1, torch.get_num_threads())


def sign_ef_multi(xs, residuals, residuals_out, wire, offsets, blocks, scale, velocity=None):
    """Encode every tensor into ``wire`` at its offset; returns per-block ``(sq, err)`` (fp32)."""
    if velocity is not None:
        return _sign_ef_velocity_multi(xs, residuals, residuals_out, wire, offsets, blocks, velocity)
    T = len(xs)
    segs = (_SignSeg * T)()
    first, base, total = 0, wire.data_ptr(), 0
    for t, (x, e, r, off, block) in enumerate(zip(xs, residuals, residuals_out, offsets, blocks)):
        n = x.numel()
        segs[t] = _SignSeg(x.data_ptr(), _ptr(e), _ptr(r), base + off, n, block, first)
        first += num_blocks(n, block)
        total += n
    sq, err = torch.empty(first), torch.empty(first)
    fn = _library().lc_sign_ef_multi
    args = (segs, T, scale, sq.data_ptr(), err.data_ptr())
    _run(lambda lo, hi: fn(*args, lo, hi), _split_even(first, _workers(total)))
    return sq, err


def _sign_ef_velocity_multi(xs, residuals, residuals_out, wire, offsets, blocks, v):
    T = len(xs)
    segs = (_SignVSeg * T)()
    first, base, total = 0, wire.data_ptr(), 0
    for t, (x, e, r, off, block) in enumerate(zip(xs, residuals, residuals_out, offsets, blocks)):
        n = x.numel()
        segs[t] = _SignVSeg(x.data_ptr(), _ptr(v.p[t]), _ptr(v.u_old[t]), v.u_out[t].data_ptr(), _ptr(e), _ptr(r),
                            base + off, n, block, first)  # fmt: skip
        first += num_blocks(n, block)
        total += n
    sq, err = torch.empty(first), torch.empty(first)
    fn, params = _library().lc_sign_ef_velocity_multi, _vparams(v)
    args = (segs, T, ctypes.byref(params), sq.data_ptr(), err.data_ptr())
    _run(lambda lo, hi: fn(*args, lo, hi), _split_even(first, _workers(total)))
    return sq, err


def sign_decode_multi(wires, offsets, outs, blocks, assign):
    """``outs[t] (+)= sum_r decode(wires[r][offsets[t]:])`` for every tensor."""
    T = len(outs)
    segs = (_SignDSeg * T)()
    first, total = 0, 0
    for t, (out, off, block) in enumerate(zip(outs, offsets, blocks)):
        n = out.numel()
        segs[t] = _SignDSeg(out.data_ptr(), n, block, first, off)
        first += num_blocks(n, block)
        total += n
    bases = _ptrs(wires)
    fn = _library().lc_sign_decode_multi
    args = (segs, T, bases, len(wires), int(assign))
    _run(lambda lo, hi: fn(*args, lo, hi), _split_even(first, _workers(total)))
    return outs


def topk_ef_multi(xs, residuals, residuals_out, ks, wire, offsets, scale, samples, velocity=None):
    """The exact top-k of every ``v = scale * x + residual`` into ``wire`` (see lightning_compress_kernels.topk).

    ``samples[t]`` is ``(sample_size, sample_rank, k0, k1)``, or ``None`` to take every entry as
    a candidate. Returns ``(sq, kept_sq, status)`` per tensor; status 1 means too few
    candidates passed (the caller takes the exact path; ``residuals_out`` then holds ``v``).
    """
    T = len(xs)
    jobs = (_TopKJob * T)()
    base = wire.data_ptr()
    workers = _workers(sum(x.numel() for x in xs))
    chunk_specs, caps = [], []
    for t, (x, e, r, k, off, sample) in enumerate(zip(xs, residuals, residuals_out, ks, offsets, samples)):
        n = x.numel()
        size, rank, k0, k1 = sample if sample is not None else (0, 0, 0, 0)
        jobs[t] = _TopKJob(x.data_ptr(), _ptr(e), _ptr(r), n, k, size, rank, k0, k1, base + off, base + off + 4 * k)
        if velocity is not None:
            jobs[t].p, jobs[t].u_old = _ptr(velocity.p[t]), _ptr(velocity.u_old[t])
            jobs[t].u_out = velocity.u_out[t].data_ptr()
        pieces = max(1, min(workers, n // _PARALLEL_MIN))
        for lo, hi in _split_even(n, pieces):
            share = -(-k * (hi - lo) // max(n, 1))
            # Room for the candidates a threshold a few deviations above the k-th lets through;
            # with no sample every entry is one.
            cap = (hi - lo) if sample is None else min(hi - lo, 2 * share + 4096)
            chunk_specs.append((t, lo, hi))
            caps.append(cap)
    cand = torch.empty(sum(caps), dtype=torch.int64)
    cval = torch.empty(sum(caps), dtype=torch.float32)
    chunks = (_TopKChunk * len(chunk_specs))()
    at = 0
    for c, ((t, lo, hi), cap) in enumerate(zip(chunk_specs, caps)):
        chunks[c] = _TopKChunk(t, lo, hi, cand.data_ptr() + 8 * at, cval.data_ptr() + 4 * at, cap, 0, 0.0)
        at += cap
    lib = _library()
    threshold, pass_, finish = lib.lc_topk_threshold, lib.lc_topk_pass, lib.lc_topk_finish
    by_job = _split_even(T, min(workers, T))
    params = _vparams(velocity)
    vp = ctypes.byref(params) if params is not None else None
    _run(lambda lo, hi: threshold(jobs, scale, vp, lo, hi), by_job)
    _run(lambda lo, hi: pass_(jobs, chunks, scale, vp, lo, hi), _split_even(len(chunks), min(workers, len(chunks))))
    _run(lambda lo, hi: finish(jobs, chunks, len(chunks), lo, hi), by_job)
    return [(j.sq, j.kept_sq, j.status) for j in jobs]


def sparse_decode_multi(wires, offsets, ks, outs, assign):
    """``outs[t] (+)= sum_r scatter(wires[r][offsets[t]:])``; k values then k int32 indices."""
    T = len(outs)
    segs = (_SparseDSeg * T)(*(_SparseDSeg(o.data_ptr(), o.numel(), k, off) for o, k, off in zip(outs, ks, offsets)))
    bases = _ptrs(wires)
    fn = _library().lc_sparse_decode_multi
    ranges = _split_even(T, min(_workers(sum(o.numel() for o in outs)), T))
    bad = [0] * len(ranges)

    def run(j: int) -> None:
        bad[j] = fn(segs, bases, len(wires), int(assign), *ranges[j])

    _run(lambda lo, hi: [run(j) for j in range(lo, hi)], [(j, j + 1) for j in range(len(ranges))])
    if sum(bad):
        raise RuntimeError(f"{sum(bad)} sparse payload indices lie outside their tensor: the payload is corrupt")
    return outs


def velocity(g, p, u_old, u_out, s_out, xs, wds, m, a0, a1, c, post, lookahead):
    fn = _library().lc_velocity
    args = (_ptr(g), _ptr(p), _ptr(u_old), _ptr(u_out), _ptr(s_out), xs, wds, m, a0, a1, c, post, int(lookahead))
    _run(lambda lo, hi: fn(*args, lo, hi), _ranges(g.numel(), g.numel()))
