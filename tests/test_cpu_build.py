"""Planning, building, caching and loading the C library (kernels/_build_plan.py, kernels/_build.py).

Most cases build a one-function C file, loading ``_build`` and ``_build_plan`` from their files
in subprocesses so that they start without torch; the last ones run the real kernels.cpu (its
build part) in a subprocess.
Every subprocess runs under a timeout, and every cache lives under tmp_path.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from lightning_compress_kernels import _build, _build_plan

REAL_CC = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
needs_cc = pytest.mark.skipif(REAL_CC is None, reason="no C compiler on PATH")
posix_only = pytest.mark.skipif(not hasattr(os, "getuid") or _build.fcntl is None, reason="POSIX owners and flock")

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O1", "-fPIC", "-shared"]
VARIANTS = (["-march=native"], [])
TINY = "int lc_answer(void) { return 42; }\n"
# A library that announces being loaded: the constructor runs at dlopen, before any call.
PLANTED = textwrap.dedent(
    """
    #include <stdio.h>
    __attribute__((constructor)) static void planted(void) {
        FILE *f = fopen("%s", "w");
        if (f) fclose(f);
    }
    int lc_answer(void) { return 7; }
    """
)
# Loads _build (and the _build_plan it imports) from their files, without the kernels package's
# __init__ (which imports torch): a bare package object with the folder as its path stands in for it.
PRELUDE = textwrap.dedent(
    f"""
    import importlib, sys, types
    package = types.ModuleType("kernels_without_torch")
    package.__path__ = [{str(ROOT / "kernels")!r}]
    sys.modules[package.__name__] = package
    b = importlib.import_module(package.__name__ + "._build")
    """
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(_build_plan.CACHE_ENV, str(path))
    monkeypatch.delenv("CC", raising=False)
    return path


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "tiny.c"
    path.write_text(TINY)
    return path


def fake_cc(tmp_path: Path, source: Path, sleep: float = 0.0) -> tuple[Path, Path]:
    """A compiler wrapper that logs each compile of ``source`` (not the probes), waits, then runs the real one."""
    log, script = tmp_path / "cc.log", tmp_path / "fake-cc"
    script.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do if [ "$a" = "{source}" ]; then echo "$$ $*" >> "{log}"; sleep {sleep}; fi; done\n'
        f'exec "{REAL_CC}" "$@"\n'
    )
    script.chmod(0o755)
    return script, log


def compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def load(source: Path) -> ctypes.CDLL:
    return _build.load("tiny", source, FLAGS, VARIANTS)


def planned(source: Path, flags=FLAGS + VARIANTS[0]) -> _build_plan.Build:
    cc = _build_plan.compiler()
    version = _build_plan.compiler_version(cc)
    return _build_plan.plan("tiny", source.read_bytes(), flags, _build_plan.cache_dir(), cc, version)


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        check=False,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- a normal build ---------------------------------------------------------------------
@needs_cc
@posix_only
def test_build_is_cached_checked_and_private(cache, source, tmp_path, monkeypatch) -> None:
    cc, log = fake_cc(tmp_path, source)
    monkeypatch.setenv("CC", str(cc))
    assert load(source).lc_answer() == 42
    build = planned(source)
    meta = json.loads(build.sidecar.read_text())
    assert meta["size"] == build.library.stat().st_size and meta["sha256"] == sha256(build.library)
    assert build.library.stat().st_mode & 0o777 == 0o700 and cache.stat().st_mode & 0o777 == 0o700
    assert _build.problem(build) is None
    load(source)
    assert compiles(log) == 1, "a valid cached library was compiled again"
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))


# ----- the cache key ----------------------------------------------------------------------
@needs_cc
def test_key_follows_cpu_target_compiler_version_source_and_flags(cache, source, monkeypatch) -> None:
    cc = _build_plan.compiler()
    code = source.read_bytes()
    native = FLAGS + ["-march=native"]

    def key(target=("-march=a", "-mavx2"), version="cc 12.2.0", code=code, flags=native) -> str:
        monkeypatch.setattr(_build_plan, "target_options", lambda cc, flags: target)
        return _build_plan.plan("tiny", code, flags, cache, cc, version).key

    base = key()
    assert key() == base
    assert key(target=("-march=a", "-mavx2", "-mavx512f")) != base  # another CPU
    assert key(version="cc 13.1.0") != base  # another compiler
    assert key(code=code + b"\n") != base
    assert key(flags=FLAGS + ["-march=native", "-O3"]) != base


@needs_cc
def test_another_cpu_builds_its_own_file(cache, source, monkeypatch) -> None:
    real = _build_plan.target_options
    assert load(source).lc_answer() == 42
    monkeypatch.setattr(_build_plan, "target_options", lambda cc, flags: (*real(cc, flags), "-mfeature-of-another-cpu"))
    assert load(source).lc_answer() == 42
    assert len(list(cache.glob("tiny-*.so"))) == 2


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 feature names")
def test_native_target_names_the_cpu_features() -> None:
    cc = _build_plan.compiler()
    native = _build_plan.target_options(cc, FLAGS + ["-march=native"])
    baseline = _build_plan.target_options(cc, FLAGS + ["-march=x86-64"])
    assert native and baseline and native != baseline
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " avx512f" in cpuinfo.read_text():
        assert "-mavx512f" in native or "+avx512f" in native, native


def test_target_is_read_from_gcc_and_clang_dry_runs() -> None:
    gcc = (
        ' /usr/lib/gcc/x86_64-linux-gnu/12/cc1 -quiet /dev/null "-march=cooperlake" -mavx512f'
        ' --param "l1-cache-size=48" -o /tmp/ccX.s'
    )
    clang = (
        '"/usr/bin/clang-16" "-cc1" "-triple" "x86_64-pc-linux-gnu" "-target-cpu" "znver4" "-target-feature" "+avx512f"'
    )
    # Lines that are not the compiler proper's (configure options, the driver's echo) are ignored.
    noise = "Configured with: ../configure -mfoo\nCOLLECT_GCC_OPTIONS='-march=native' '-o' '/dev/null'"
    gcc_target = ("-march=cooperlake", "-mavx512f", "--param", "l1-cache-size=48")
    assert _build_plan._parse_target(noise + "\n" + gcc) == gcc_target
    assert _build_plan._parse_target(clang) == (
        "-triple",
        "x86_64-pc-linux-gnu",
        "-target-cpu",
        "znver4",
        "-target-feature",
        "+avx512f",
    )


@needs_cc
def test_native_build_needs_a_readable_target(cache, source, monkeypatch) -> None:
    # A compiler whose dry run names no target would key every CPU alike: no native build then.
    monkeypatch.setattr(_build_plan, "target_options", lambda cc, flags: ())
    with pytest.raises(_build_plan.BuildError, match="cannot tell"):
        planned(source)
    assert load(source).lc_answer() == 42
    assert "-march=native" not in json.loads(next(cache.glob("tiny-*.json")).read_text())["command"]


# ----- checks before loading --------------------------------------------------------------
def plant(path: Path, marker: Path, tmp_path: Path) -> None:
    """Compile a foreign library that touches ``marker`` when loaded, and put it at ``path``."""
    src = tmp_path / "planted.c"
    src.write_text(PLANTED % marker)
    subprocess.run([REAL_CC, *FLAGS, "-o", str(path), str(src)], check=True, timeout=120)
    path.chmod(0o700)


@needs_cc
@posix_only
def test_planted_library_without_sidecar_is_rebuilt_not_loaded(cache, source, tmp_path) -> None:
    build = planned(source)
    marker = tmp_path / "planted-ran"
    plant(build.library, marker, tmp_path)
    planted_hash = sha256(build.library)
    assert "not built yet" in _build.problem(build)
    lib = load(source)
    assert not marker.exists(), "the planted library was loaded"
    assert lib.lc_answer() == 42
    assert sha256(build.library) != planted_hash and _build.problem(build) is None


@needs_cc
@posix_only
@pytest.mark.parametrize("damage", ("planted", "truncated", "zero-byte", "sidecar-lies"))
def test_damaged_cached_library_is_rebuilt_in_a_fresh_process(cache, source, tmp_path, damage) -> None:
    # Built and reloaded in fresh processes: a process that has the library mapped while its file is
    # truncated in place dies with SIGBUS when it next touches those pages (at exit, if not before),
    # and glibc would reuse the mapping instead of loading the path again.
    built = run_python(f"b.load('tiny', {str(source)!r}, {FLAGS!r}, {VARIANTS!r})")
    assert built.returncode == 0, built.stderr
    build = planned(source)
    good = build.library.read_bytes()
    marker = tmp_path / "planted-ran"
    if damage == "planted":
        plant(build.library, marker, tmp_path)
    elif damage == "truncated":
        build.library.write_bytes(good[: len(good) // 2])  # mapping this one dies with SIGBUS
    elif damage == "zero-byte":
        build.library.write_bytes(b"")
    else:  # the sidecar matches the truncated file's size but not its hash
        build.library.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    assert _build.problem(build) is not None
    proc = run_python(
        f"""
        lib = b.load("tiny", {str(source)!r}, {FLAGS!r}, {VARIANTS!r})
        print("answer", lib.lc_answer())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer 42" in proc.stdout
    assert not marker.exists(), "the planted library was loaded"
    assert _build.problem(build) is None and build.library.stat().st_size == len(good)


@needs_cc
@posix_only
@pytest.mark.parametrize("how", ("world-writable", "foreign-owner"))
def test_library_writable_or_owned_by_others_is_not_loaded(cache, source, monkeypatch, how) -> None:
    load(source)
    build = planned(source)
    if how == "world-writable":
        build.library.chmod(0o777)
        assert "writable by group or others" in _build.problem(build)
    else:
        monkeypatch.setattr(_build_plan.os, "getuid", lambda: build.library.stat().st_uid + 1)
        assert "not to this user" in _build.problem(build)
        monkeypatch.undo()
        monkeypatch.setenv(_build_plan.CACHE_ENV, str(cache))
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(build.library, 65534, 65534)
    inode = build.library.stat().st_ino
    load(source)
    st = build.library.stat()
    assert st.st_ino != inode and st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    assert _build.problem(build) is None


# ----- the private fallback directory -----------------------------------------------------
@pytest.fixture
def shared_tmp(tmp_path, monkeypatch) -> Path:
    """A stand-in for /tmp (world-writable, sticky), with the main cache directory unusable."""
    path = tmp_path / "shared-tmp"
    path.mkdir()
    path.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(_build_plan.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.delenv("CC", raising=False)
    return path


@posix_only
def test_unusable_cache_dir_falls_back_to_a_private_one(shared_tmp) -> None:
    private = _build_plan.cache_dir()
    assert private == shared_tmp / f"lightning_compress-{os.getuid()}"
    st = private.lstat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()


@posix_only
def test_group_writable_cache_dir_is_not_used(tmp_path, shared_tmp, monkeypatch) -> None:
    group_writable = tmp_path / "team-cache"
    group_writable.mkdir()
    group_writable.chmod(0o775)
    monkeypatch.setenv(_build_plan.CACHE_ENV, str(group_writable))
    assert _build_plan.cache_dir() == shared_tmp / f"lightning_compress-{os.getuid()}"


@needs_cc
@posix_only
@pytest.mark.parametrize("how", ("world-writable", "foreign-owner", "symlink"))
def test_fallback_dir_set_up_by_someone_else_is_refused(shared_tmp, source, tmp_path, monkeypatch, how) -> None:
    uid = os.getuid()
    if how == "foreign-owner" and uid != 0:
        uid += 1  # this user then plays the other user, who created the directory first
        monkeypatch.setattr(_build_plan.os, "getuid", lambda: uid)
    private = shared_tmp / f"lightning_compress-{uid}"
    if how == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        private.symlink_to(target)
    else:
        private.mkdir(mode=0o700)
        if how == "world-writable":
            private.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(private, 65534, 65534)
    # What the other user left there under a library's name must never run.
    marker = tmp_path / "planted-ran"
    if REAL_CC and how != "symlink":
        plant(private / "tiny-0.so", marker, tmp_path)
    with pytest.raises(_build_plan.BuildError, match="no usable cache directory"):
        _build_plan.cache_dir()
    with pytest.raises(_build_plan.BuildError, match="no usable cache directory"):
        load(source)
    assert not marker.exists()


# ----- one build at a time, and killed builds ----------------------------------------------
@needs_cc
@posix_only
def test_processes_building_at_once_compile_once(cache, source, tmp_path) -> None:
    cc, log = fake_cc(tmp_path, source, sleep=1.0)  # long enough for both to want to build
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    code = f"""
        import os, time
        open(os.path.join({str(barrier)!r}, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir({str(barrier)!r})) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        lib = b.load("tiny", {str(source)!r}, {FLAGS!r}, {VARIANTS!r})
        print("answer", lib.lc_answer())
        """
    env = {**os.environ, "CC": str(cc)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "answer 42" in out, err
    assert compiles(log) == 1


@needs_cc
@posix_only
def test_waiting_for_a_hung_build_gives_up_with_the_lock_named(cache, source, monkeypatch) -> None:
    import fcntl

    monkeypatch.setattr(_build, "LOCK_TIMEOUT_S", 0.3)
    cache.mkdir(mode=0o700)
    with open(cache / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: conflicts even within this process
        with pytest.raises(_build_plan.BuildError, match="build.lock"):
            load(source)


@needs_cc
@posix_only
def test_killed_build_leaves_no_library_and_its_temp_file_is_cleaned(cache, source, tmp_path) -> None:
    cc, log = fake_cc(tmp_path, source, sleep=60)
    code = f"""
        b.load("tiny", {str(source)!r}, {FLAGS!r}, {VARIANTS!r})
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        env={**os.environ, "CC": str(cc)},
        start_new_session=True,  # its own process group: the sleeping compiler dies with it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while compiles(log) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compiles(log) == 1, "the build never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    build = planned(source)
    assert not build.library.exists() and not build.sidecar.exists()
    leftovers = list(cache.glob(".tiny-*.tmp"))
    assert leftovers, "expected the killed build's temporary file"
    assert not list(cache.glob("*.so")), "a killed build left a file named like a library"
    old = time.time() - _build.STALE_AFTER_S - 60
    for path in leftovers:
        os.utime(path, (old, old))
    assert load(source).lc_answer() == 42
    assert not any(path.exists() for path in leftovers)


@needs_cc
@posix_only
def test_only_stale_temp_files_are_cleaned(cache, source) -> None:
    cache.mkdir(mode=0o700)
    stale, fresh = cache / ".tiny-0.abc.tmp", cache / ".tiny-1.def.tmp"
    other = cache / "notes.tmp"
    for path in (stale, fresh, other):
        path.write_text("")
    old = time.time() - _build.STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    load(source)
    assert not stale.exists() and fresh.exists() and other.exists()


# ----- kernels.cpu: the warning and prepare() ----------------------------------------------
CPU_CODE = """
    import os, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import lightning_compress_kernels.cpu as cpu
        from lightning_compress_kernels import sign
        ready = cpu.prepare()
        for _ in range(3):
            sign.sign_ef(torch.randn(100), block=8)
            if os.environ.get("LIGHTNING_COMPRESS_KERNELS") != "torch":  # these ask for the library
                cpu.available(), cpu.build_error(), cpu.library_path()
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("READY", ready, "WARNINGS", len(runtime))
    for message in runtime:
        print("MESSAGE", message)
    if os.environ.get("LIGHTNING_COMPRESS_KERNELS") != "torch":
        print("PATH", cpu.library_path())
    """


def run_cpu(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_COMPRESS_KERNELS", "CC")}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CPU_CODE)],
        check=False,
        env={**base, _build_plan.CACHE_ENV: str(tmp_path / "cache"), **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@posix_only
def test_no_compiler_warns_once_naming_the_fix(tmp_path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    out = run_cpu(tmp_path, PATH=str(empty), CC=str(tmp_path / "no-such-cc")).stdout
    assert "READY False WARNINGS 1" in out, out
    message = out.split("MESSAGE", 1)[1]
    assert "no C compiler" in message and "CC" in message and "LIGHTNING_COMPRESS_KERNELS=torch" in message


@posix_only
def test_kernels_torch_builds_nothing_and_does_not_warn(tmp_path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    out = run_cpu(tmp_path, PATH=str(empty), LIGHTNING_COMPRESS_KERNELS="torch").stdout
    assert "READY False WARNINGS 0" in out, out
    assert not (tmp_path / "cache").exists()


@needs_cc
@posix_only
def test_prepare_builds_the_kernels_into_the_cache(tmp_path) -> None:
    out = run_cpu(tmp_path).stdout
    assert "READY True WARNINGS 0" in out, out
    path = Path(out.split("PATH", 1)[1].strip())
    assert path.parent == tmp_path / "cache" and path.name.startswith("cpu_ops-")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256(path) and "-march=native" in meta["command"]
