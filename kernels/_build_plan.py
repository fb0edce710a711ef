"""Plan a build of one C source: probe the compiler and its target, pick the cache directory, name the files.

Nothing here compiles, and only the standard library is used;
:mod:`lightning_compress_kernels._build` checks, builds and loads the files that :func:`plan` names.

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

**Cache directory.** ``$LIGHTNING_COMPRESS_CACHE`` or else ``~/.cache/lightning_compress``,
which must be owned by this user and not writable by group or others. If it cannot be used,
the private directory ``<tmp>/lightning_compress-<uid>`` is (created with mode 0700, checked
the same way, symlinks refused); if that cannot be used either, nothing is built or loaded.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "Build",
    "BuildError",
    "cache_dir",
    "compiler",
    "compiler_version",
    "plan",
    "target_options",
]

CACHE_ENV = "LIGHTNING_COMPRESS_CACHE"
PROBE_TIMEOUT_S = 60.0
_FORMAT = 1  # bump when what a cached file holds or how it is keyed changes
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
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
