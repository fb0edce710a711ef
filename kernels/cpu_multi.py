"""The multi-tensor ops of ``cpu_ops.c``: a whole bucket of tensors in one call.

Each tensor of the bucket is described by a ``ctypes.Structure`` (its pointers, size, block
and where its part of the wire starts); the bucket's blocks, or its tensors, are cut into one
range per torch intra-op thread, each range one call into C. The library, its
thread pool and the single-tensor ops are in :mod:`lightning_compress_kernels.cpu`; as there,
the wrappers take already-checked arguments (see :func:`lightning_compress_kernels.sign.sign_ef_multi`,
:func:`lightning_compress_kernels.sign.sign_decode_multi` and the ``*_multi`` ops of
:mod:`lightning_compress_kernels.topk`).
"""

from __future__ import annotations

import ctypes

import torch

from ._blocks import num_blocks
from .cpu import _F, _I, _P, _PARALLEL_MIN, _library, _ptr, _ptrs, _run


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
