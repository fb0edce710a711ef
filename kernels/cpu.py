"""The CPU path: the C functions of ``cpu_ops.c``, built on first use and called via ctypes.

The library is compiled once per machine with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into ``$LIGHTNING_COMPRESS_CACHE`` (default
``~/.cache/lightning_compress``), keyed by a hash of the source and the flags. If no
compiler works, :func:`available` is False and the ops use their torch twins.

Large tensors are cut into one range per torch intra-op thread; ctypes releases the GIL,
so the ranges run in parallel. The wrappers here take already-checked arguments (see the
public ops in :mod:`kernels.sign`, :mod:`kernels.qsgd`, :mod:`kernels.topk`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from kernels._blocks import num_blocks
from kernels.rng import stream_keys

__all__ = ["available", "build_error", "library_path"]

_SOURCE = Path(__file__).with_name("cpu_ops.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
_NATIVE = ["-march=native"]
_PARALLEL_MIN = 1 << 18  # elements below which one thread does the whole tensor

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "lc_sign_ef": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I],
    "lc_sign_decode_add": [_P, _P, _I, _P, _I, _I, _I, _I],
    "lc_qsgd_encode": [_P, _P, _P, _P, _I, _I, _I, ctypes.c_uint32, ctypes.c_uint32, _I, _I],
    "lc_qsgd_decode_add": [_P, _P, _P, _I, _P, _I, _I, _I, _I, _I],
    "lc_sign_server": [_P, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I],
    "lc_add": [_P, _P, _P, _I, _I],
    "lc_all_finite": [_P, _I, _I],
    "lc_select": [_P, ctypes.c_float, _I, _I, _P, _P, _P],
}


def _cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_COMPRESS_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "lightning_compress"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"lightning_compress-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    source = _SOURCE.read_bytes()
    errors = []
    for extra in (_NATIVE, []):
        flags = _FLAGS + extra
        key = hashlib.sha1(source + " ".join([cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"cpu_ops-{key}.so"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            proc = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-400:]}")
                continue
            os.replace(tmp, target)  # atomic: concurrent builders (ranks) never see half a file
        lib = ctypes.CDLL(str(target))
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        lib.lc_all_finite.restype = ctypes.c_int64
        return lib
    raise RuntimeError("building the CPU kernels failed: " + " | ".join(errors))


def _library() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, read-only disk, odd platform: use the twins
                    _error = f"{type(exc).__name__}: {exc}"
    return _lib


def available() -> bool:
    """The CPU library is built (building it now if needed)."""
    return _library() is not None


def build_error() -> str | None:
    """Why the library could not be built, if it could not."""
    _library()
    return _error


def library_path() -> str | None:
    """File of the loaded library."""
    lib = _library()
    return lib._name if lib is not None else None


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
def sign_ef(x, residual, block, residual_out):
    n = x.numel()
    nb = num_blocks(n, block)
    scales, sq = torch.empty(nb), torch.empty(nb)
    packed = torch.empty(-(-n // 8), dtype=torch.uint8)
    lib = _library()
    args = (_ptr(x), _ptr(residual), _ptr(residual_out), _ptr(scales), _ptr(sq), _ptr(packed), n, block)
    _run(lambda lo, hi: lib.lc_sign_ef(*args, lo, hi), _ranges(nb, n))
    return scales, packed, sq


def sign_decode_add(scales, packed, out, block):
    n = out.numel()
    scales, packed = _contig(scales), _contig(packed)
    ps, pp = _ptrs(scales), _ptrs(packed)
    lib = _library()
    _run(lambda lo, hi: lib.lc_sign_decode_add(ps, pp, len(scales), _ptr(out), n, block, lo, hi), _ranges(num_blocks(n, block), n))
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
