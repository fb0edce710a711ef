"""Build one C source into a shared library, cache it per machine and CPU, and load it with ctypes.

Used by :mod:`lightning_compress_kernels.cpu`; standard library only, so it works wherever the kernels import.

**Target.** The library is compiled with ``-march=native`` (if that fails, for the
compiler's default target), so it may hold instructions, AVX-512 for instance, that other
CPUs lack; the cache is keyed on that target. The alternative, one portable library with
runtime dispatch (``target`` attributes or ``ifunc`` resolvers per function), would need
every hot loop written once per instruction set; with ``-march=native`` the C stays plain
C99 and the compiler vectorizes it for whatever this CPU has.

**Cache key.** sha256 over the source, the flags, the compiler (its path and the first line
of ``--version``) and the target the compiler resolves the flags to: the options that its
dry run (``cc -### ...``) passes to the compiler proper, ``-march=``/``-m...``/``--param``
for gcc and ``-triple``/``-target-cpu``/``-target-feature`` for clang. That is what
``-march=native`` means on this CPU for this compiler, so nodes that share a home directory
share a file only when the same instructions are allowed on both. (``/proc/cpuinfo`` is
Linux-only and lists features the compiler may not use, which would only split the cache.)
A compiler whose dry run names no target gets no native build, only the default one.

**Checks before loading.** A cached library is loaded only if it is a regular file owned by
this user and not writable by group or others, and its size and sha256 match the sidecar
``<name>-<key>.json`` written when it was built; otherwise it is rebuilt, never mapped (a
truncated file would kill the process with SIGBUS). The cache directory,
``$LIGHTNING_COMPRESS_CACHE`` or else ``~/.cache/lightning_compress``, must be owned by this
user and not writable by group or others. If it cannot be used, the private directory
``<tmp>/lightning_compress-<uid>`` is (created with mode 0700, checked the same way,
symlinks refused); if that cannot be used either, nothing is built or loaded.

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
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # no flock (Windows): builds may then run at once, each still replacing atomically
    fcntl = None

__all__ = [
    "CACHE_ENV",
    "STALE_AFTER_S",
    "Build",
    "BuildError",
    "CLibrary",
    "cache_dir",
    "compiler",
    "compiler_version",
    "ensure",
    "load",
    "plan",
    "problem",
    "target_options",
]

CACHE_ENV = "LIGHTNING_COMPRESS_CACHE"
STALE_AFTER_S = 600.0  # a temporary file older than this belongs to a build that was killed
LOCK_TIMEOUT_S = 600.0  # a build holding the lock longer than this hangs; give up rather than wait forever
COMPILE_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 60.0
_FORMAT = 1  # bump when what a cached file holds or how it is keyed changes
_LOCK_NAME = "build.lock"
_TMP_SUFFIX = ".tmp"
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_CLANG_TARGET = frozenset({"-triple", "-target-cpu", "-target-feature", "-tune-cpu", "-target-abi"})


class BuildError(RuntimeError):
    """The library cannot be built or loaded here; the message says why and what to do."""


@dataclass(frozen=True)
class Build:
    """One variant of the library: the command that builds it, what its key is made of, and its files."""

    command: tuple[str, ...]  # compiler and flags, without the output and the source
    libraries: tuple[str, ...]  # linker arguments after the source
    version: str  # first line of the compiler's --version
    target: tuple[str, ...]  # target options from the compiler's dry run
    key: str
    library: Path
    sidecar: Path  # JSON with the library's size and sha256, written when it was built


# ----- probes -----------------------------------------------------------------------------
def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else cc, gcc or clang.

    Raises:
        BuildError: none of them is on ``PATH``.
    """
    requested = os.environ.get("CC", "").strip()
    candidates = [["cc"], ["gcc"], ["clang"]]
    if requested:
        try:
            candidates.insert(0, shlex.split(requested))
        except ValueError:  # unbalanced quotes: treat it as one path
            candidates.insert(0, [requested])
    for words in candidates:
        found = shutil.which(words[0]) if words else None
        if found:
            return [found, *words[1:]]
    raise BuildError(
        f"no C compiler found: CC={requested!r} is not on PATH and neither is cc, gcc or clang; "
        "install one or set CC to its path"
    )


def _probe(command: Sequence[str]) -> subprocess.CompletedProcess:
    # LC_ALL=C: the output is parsed and hashed, so it must not depend on the user's locale.
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run(
            list(command),
            check=False,
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"`{' '.join(command)}` ran for more than {PROBE_TIMEOUT_S:.0f} s; set CC to a working compiler"
        ) from None
    except OSError as exc:
        raise BuildError(f"`{' '.join(command)}` did not start ({exc}); set CC to a working compiler") from exc


def compiler_version(cc: Sequence[str]) -> str:
    """First line of ``cc --version``, e.g. ``cc (Debian 12.2.0-14+deb12u1) 12.2.0``.

    Raises:
        BuildError: the compiler does not run.
    """
    proc = _probe([*cc, "--version"])
    line = next((line.strip() for line in proc.stdout.splitlines() if line.strip()), "")
    if proc.returncode != 0 or not line:
        detail = proc.stderr.strip()[-300:] or f"exit status {proc.returncode}"
        raise BuildError(f"`{cc[0]} --version` failed: {detail}; set CC to a working compiler")
    return line


def _parse_target(dry_run: str) -> tuple[str, ...]:
    """The target options on the compiler-proper lines (gcc's ``cc1``, clang's ``-cc1``) of a ``-###`` dry run."""
    options: list[str] = []
    for line in dry_run.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if not words or not (os.path.basename(words[0]).startswith("cc1") or "-cc1" in words):
            continue
        for i, word in enumerate(words):
            if word.startswith(("-m", "--param=")):
                options.append(word)
            elif (word in _CLANG_TARGET or word == "--param") and i + 1 < len(words):
                options += [word, words[i + 1]]
    return tuple(options)


def target_options(cc: Sequence[str], flags: Sequence[str]) -> tuple[str, ...] | None:
    """What ``cc`` compiles for under ``flags`` (``-march=native`` spelled out), or None if it rejects them.

    An empty tuple means the dry run named no target (a compiler this module cannot read).
    """
    proc = _probe([*cc, *flags, "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull])
    if proc.returncode != 0:
        return None
    return _parse_target(proc.stderr + "\n" + proc.stdout)


# ----- where and under which name ---------------------------------------------------------
def _check_private(path: Path, st: os.stat_result, directory: bool) -> None:
    """Raise unless ``st`` is a directory (or regular file) owned by this user and writable by no one else."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise BuildError(f"{path} is not a {'directory' if directory else 'regular file'}")
    if st.st_uid != os.getuid():
        raise BuildError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if st.st_mode & _WRITABLE_BY_OTHERS:
        raise BuildError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}), so its code cannot be "
            f"trusted; run `chmod go-w {path}`"
        )


def cache_dir() -> Path:
    """Where built libraries live: ``$LIGHTNING_COMPRESS_CACHE``, ``~/.cache/lightning_compress``, or a private one.

    Raises:
        BuildError: neither the cache directory nor ``<tmp>/lightning_compress-<uid>`` is
            a directory of this user's that no one else can write.
    """
    reasons = []
    try:
        root = os.environ.get(CACHE_ENV)
        main = Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_compress"
        main.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(main, main.stat(), directory=True)  # following symlinks: ~/.cache may be one
        if not os.access(main, os.W_OK | os.X_OK):
            raise BuildError(f"{main} is not writable")
        return main
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home directory, or BuildError
        reasons.append(str(exc))
    # The shared temp directory: anyone may have created this name first, hence lstat (no
    # symlink is followed) and the owner and mode checks before anything is loaded from it.
    private = Path(tempfile.gettempdir()) / f"lightning_compress-{os.getuid()}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(private, 0o700)
        _check_private(private, private.lstat(), directory=True)
        return private
    except (OSError, BuildError) as exc:
        reasons.append(str(exc))
    raise BuildError(
        "no usable cache directory (" + "; ".join(reasons) + f"); set {CACHE_ENV} to a directory of your own "
        "that no one else can write"
    )


def cache_key(
    source: bytes, command: Sequence[str], libraries: Sequence[str], version: str, target: Sequence[str]
) -> str:
    """Hex digest naming one build: equal only for the same source, compiler, flags and target."""
    parts = [_FORMAT, sys.platform, platform.machine(), list(command), list(libraries), version, list(target)]
    digest = hashlib.sha256(source)
    digest.update(json.dumps(parts).encode())
    return digest.hexdigest()[:24]


def plan(
    name: str,
    source: bytes,
    flags: Sequence[str],
    directory: Path,
    cc: Sequence[str],
    version: str,
    libraries: Sequence[str] = (),
) -> Build:
    """The files that ``source`` built with ``flags`` lives in; probes the compiler, builds nothing.

    Raises:
        BuildError: the compiler rejects the flags, or they ask for the native CPU and the
            compiler's dry run does not say what that is (the key could not tell CPUs apart).
    """
    target = target_options(cc, flags)
    if target is None:
        raise BuildError(f"{cc[0]} rejects {' '.join(flags)}")
    if not target and any("native" in flag for flag in flags):
        raise BuildError(
            f"cannot tell what {cc[0]} targets with {' '.join(flags)} (its dry run names no target), so a build "
            "could not be told apart from other CPUs' and is not made"
        )
    command = (*cc, *flags)
    key = cache_key(source, command, libraries, version, target)
    stem = f"{name}-{key}"
    return Build(command, tuple(libraries), version, target, key, directory / f"{stem}.so", directory / f"{stem}.json")


# ----- checking, building, loading --------------------------------------------------------
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
