"""Build one C source into a shared library, cache it per machine and CPU, and load it with ctypes.

Used by :mod:`lightning_compress_kernels.cpu`; standard library only, so it works wherever the kernels import.
Which compiler, target, cache directory and file names a build gets is decided by
:mod:`lightning_compress_kernels._build_plan`; this module checks, builds and loads those files.

**Checks before loading.** A cached library is loaded only if it is a regular file owned by
this user and not writable by group or others, and its size and sha256 match the sidecar
``<name>-<key>.json`` written when it was built; otherwise it is rebuilt, never mapped (a
truncated file would kill the process with SIGBUS).

**Building.** One process at a time per directory, under ``fcntl.flock`` on ``build.lock``;
a process that waited for the lock checks the cache again before compiling. The compiler
writes a hidden temporary name in the same directory that ``os.replace`` turns into the
library at the end, so a killed build never leaves a file under the library's name; the
next build removes temporary files older than :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ._build_plan import CACHE_ENV, Build, BuildError, _check_private, cache_dir, compiler, compiler_version, plan

try:
    import fcntl
except ImportError:  # no flock (Windows): builds may then run at once, each still replacing atomically
    fcntl = None

__all__ = ["STALE_AFTER_S", "CLibrary", "ensure", "load", "problem"]

STALE_AFTER_S = 600.0  # a temporary file older than this belongs to a build that was killed
LOCK_TIMEOUT_S = 600.0  # a build holding the lock longer than this hangs; give up rather than wait forever
COMPILE_TIMEOUT_S = 300.0
_LOCK_NAME = "build.lock"
_TMP_SUFFIX = ".tmp"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_private(path: Path, size: int | None = None) -> bytes:
    """The bytes of ``path`` if it is this user's regular file that no one else can write (and of ``size``)."""
    with open(os.open(path, _OPEN_FLAGS), "rb") as f:  # O_NOFOLLOW: a symlink is refused, not followed
        st = os.fstat(f.fileno())
        _check_private(path, st, directory=False)
        if size is not None and st.st_size != size:
            raise BuildError(f"{path} has {st.st_size} bytes, {size} were built (truncated or replaced)")
        return f.read()


def problem(build: Build) -> str | None:
    """Why the cached library of ``build`` must not be loaded, or None if it may."""
    try:
        meta = json.loads(_read_private(build.sidecar))
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
            return f"{build.sidecar} is not a sidecar this module wrote"
        data = _read_private(build.library, meta["size"])
    except FileNotFoundError:
        return "not built yet"
    except (OSError, ValueError, BuildError) as exc:
        return str(exc)
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return f"the sha256 of {build.library} differs from the one recorded when it was built"
    return None


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold the directory's build lock (released when the process dies, however it dies)."""
    if fcntl is None:
        yield
        return
    lock = directory / _LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(
                        f"another process has been building in {directory} for over {LOCK_TIMEOUT_S:.0f} s "
                        f"(it holds {lock}); stop it, or set {CACHE_ENV} to another directory"
                    ) from None
                time.sleep(0.05)
            except OSError:  # no flock on this file system (some NFS): each builder still replaces atomically
                break
        yield
    finally:
        os.close(fd)


def _clean_stale(directory: Path, name: str) -> None:
    """Remove temporary files of killed builds (old enough that no running build can own them)."""
    now = time.time()
    for path in directory.glob(f".{name}-*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - path.lstat().st_mtime > STALE_AFTER_S:
                path.unlink()


def _compile(build: Build, source: Path) -> None:
    """Compile into a hidden temporary file, record its size and hash, then move both into place."""
    directory = build.library.parent
    prefix = f".{build.library.stem}."
    fd, so_tmp = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=directory)
    os.close(fd)
    meta_tmp = None
    try:
        try:
            proc = subprocess.run(
                [*build.command, "-o", so_tmp, str(source), *build.libraries],
                check=False,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=COMPILE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"the compiler ran for more than {COMPILE_TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise BuildError(f"the compiler did not start: {exc}") from exc
        if proc.returncode != 0:
            raise BuildError(proc.stderr.strip()[-400:] or f"the compiler exited with status {proc.returncode}")
        os.chmod(so_tmp, 0o700)  # the linker's mode follows the umask; the load check refuses group-writable files
        data = Path(so_tmp).read_bytes()
        meta = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "command": list(build.command),
            "compiler": build.version,
            "target": list(build.target),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fd, meta_tmp = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
        # Library first, then sidecar: a reader between the two sees a mismatch and waits for the lock.
        os.replace(so_tmp, build.library)
        so_tmp = None
        os.replace(meta_tmp, build.sidecar)
        meta_tmp = None
    finally:
        for leftover in (so_tmp, meta_tmp):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def ensure(build: Build, source: Path, name: str) -> Path:
    """The path of a checked library for ``build``, compiling it first unless a valid one is cached."""
    if problem(build) is None:
        return build.library
    directory = build.library.parent
    with _exclusive(directory):
        if problem(build) is None:  # another process built it while this one waited for the lock
            return build.library
        _clean_stale(directory, name)
        _compile(build, source)
    return build.library


def load(
    name: str,
    source: Path,
    flags: Sequence[str],
    variants: Sequence[Sequence[str]] = ((),),
    libraries: Sequence[str] = (),
) -> ctypes.CDLL:
    """Load ``source`` as a library, building it first unless a valid copy is cached.

    Args:
        name: the library's name in the cache (``<name>-<key>.so``).
        source: the C file.
        flags: compiler flags of every variant.
        variants: extra flags, tried in order until one builds and loads, e.g.
            ``(["-march=native"], [])``.
        libraries: linker arguments placed after the source, e.g. ``["-lm"]``.

    Returns:
        The loaded library.

    Raises:
        BuildError: no compiler, no usable cache directory, or no variant builds and loads;
            the message says why for each.
    """
    cc = compiler()
    version = compiler_version(cc)
    directory = cache_dir()
    code = Path(source).read_bytes()
    errors = []
    for extra in variants:
        try:
            build = plan(name, code, [*flags, *extra], directory, cc, version, libraries)
            return ctypes.CDLL(str(ensure(build, Path(source), name)))
        except (BuildError, OSError) as exc:  # OSError: dlopen refused it (e.g. a noexec file system)
            errors.append(f"[{' '.join(extra) or 'default target'}] {exc}")
    raise BuildError(f"building {name} from {source} failed: " + " | ".join(errors))


class CLibrary:
    """A C library loaded on first use, once per process, with one warning if it cannot be.

    Args:
        name: the library's name in the cache.
        source: the C file.
        flags: compiler flags of every variant.
        variants: extra flags, tried in order (see :func:`load`).
        signatures: ``{function: argtypes}``; each function's ``restype`` is None unless
            ``restypes`` names it.
        restypes: ``{function: restype}`` for functions that return a value.
        libraries: linker arguments placed after the source.
        hint: what falls back, and how to fix or silence it; ends the warning.
    """

    def __init__(
        self,
        name: str,
        source: Path,
        flags: Sequence[str],
        variants: Sequence[Sequence[str]],
        signatures: Mapping[str, Sequence[type]],
        restypes: Mapping[str, type] | None = None,
        libraries: Sequence[str] = (),
        hint: str = "",
    ) -> None:
        self.name, self.source, self.hint = name, Path(source), hint
        self.flags, self.libraries = tuple(flags), tuple(libraries)
        self.variants = tuple(tuple(extra) for extra in variants)
        self.signatures, self.restypes = dict(signatures), dict(restypes or {})
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        """The library, loading (and if needed building) it on the first call; None if it cannot be."""
        if self._lib is None and self._error is None:
            with self._lock:
                if self._lib is None and self._error is None:
                    try:
                        lib = load(self.name, self.source, self.flags, self.variants, self.libraries)
                        for fn, argtypes in self.signatures.items():
                            func = getattr(lib, fn)
                            func.argtypes, func.restype = list(argtypes), self.restypes.get(fn)
                        self._lib = lib
                    except Exception as exc:  # no compiler, read-only disk, odd platform: the caller falls back
                        self._error = f"{type(exc).__name__}: {exc}"
                        warnings.warn(
                            f"the C library {self.name} cannot be used ({self._error}). {self.hint}".rstrip(),
                            RuntimeWarning,
                            stacklevel=3,
                        )
        return self._lib

    @property
    def error(self) -> str | None:
        """Why the library could not be loaded (None if it was, or was not tried yet)."""
        return self._error

    @property
    def path(self) -> str | None:
        """File of the loaded library (None if none is loaded)."""
        return None if self._lib is None else self._lib._name
