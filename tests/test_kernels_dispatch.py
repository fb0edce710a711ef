"""The kernel dispatcher (kernels/_dispatch.py): which path runs when, and why another does not.

Triton and the C library are made unavailable by replacing what the dispatcher asks
(``_triton_import_error``, ``cpu.available``/``cpu.build_error``), so every branch is checked
on any machine; one test builds with no compiler at all, in a child process.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import lightning_compress_kernels.cpu as cpu
import lightning_compress_kernels.cpu_multi as cpu_multi
from lightning_compress_kernels import _dispatch, finite, qsgd, sign, topk, velocity
from lightning_compress_kernels._dispatch import ENV_VAR, Choice, choose, implementation, path_for, unavailable

NO_TRITON = "ModuleNotFoundError: No module named 'triton'"
NO_LIBRARY = "no C compiler found; set CC"
# A stand-in for a CUDA tensor: the dispatcher reads only the device.
CUDA = SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def setting(monkeypatch):
    def use(path: str | None) -> None:
        if path is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, path)

    return use


@pytest.fixture
def library(monkeypatch):
    """``library(False)``: the C library could not be built; ``library(True)``: it is loaded."""

    def use(loaded: bool) -> None:
        monkeypatch.setattr(cpu, "available", lambda: loaded)
        monkeypatch.setattr(cpu, "build_error", lambda: None if loaded else NO_LIBRARY)

    return use


@pytest.fixture
def triton_imports(monkeypatch):
    def use(ok: bool, interpret: bool = False) -> None:
        monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None if ok else NO_TRITON)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")

    return use


# ----- the setting and the device ---------------------------------------------------------------
def test_auto_picks_by_device(setting, library, triton_imports) -> None:
    setting(None)
    library(True)
    triton_imports(True)
    assert choose(torch.zeros(4)) == Choice("cpu", f"{ENV_VAR}=auto and a CPU tensor")
    assert choose(CUDA) == Choice("triton", f"{ENV_VAR}=auto and a CUDA tensor")
    setting("  AUTO ")  # case and spaces do not matter; an empty value means auto
    assert path_for(torch.zeros(4)) == "cpu"
    setting("")
    assert path_for(CUDA) == "triton"
    # auto never runs Triton on CPU tensors, even in the interpreter
    triton_imports(True, interpret=True)
    assert path_for(torch.zeros(4)) == "cpu"


def test_auto_says_why_a_path_is_unavailable(setting, library, triton_imports) -> None:
    setting("auto")
    library(False)
    triton_imports(False)
    assert choose(torch.zeros(4)) == Choice(
        "torch", f"the C path is unavailable: the CPU library could not be built: {NO_LIBRARY}"
    )
    assert choose(CUDA) == Choice("torch", f"the Triton path is unavailable: triton does not import ({NO_TRITON})")
    meta = torch.empty(4, device="meta")
    assert choose(meta) == Choice("torch", "the C path is unavailable: the tensor is on meta")


def test_unavailable_names_the_cause(library, triton_imports) -> None:
    x = torch.zeros(4)
    library(True)
    triton_imports(True, interpret=False)
    assert unavailable("cpu", x) is None and unavailable("torch", x) is None and unavailable("triton", CUDA) is None
    assert unavailable("triton", x) == "a cpu tensor needs TRITON_INTERPRET=1"
    assert unavailable("cpu", CUDA) == "the tensor is on cuda:0"
    triton_imports(True, interpret=True)
    assert unavailable("triton", x) is None
    library(False)
    triton_imports(False)
    assert unavailable("cpu", x) == f"the CPU library could not be built: {NO_LIBRARY}"
    assert unavailable("triton", CUDA) == f"triton does not import ({NO_TRITON})"
    with pytest.raises(ValueError, match="auto"):
        unavailable("auto", x)


def test_forced_paths(setting, library, triton_imports) -> None:
    x = torch.zeros(4)
    library(True)
    triton_imports(True, interpret=True)
    setting("torch")
    assert choose(x) == Choice("torch", f"{ENV_VAR}=torch") and path_for(CUDA) == "torch"
    setting("cpu")
    assert choose(x) == Choice("cpu", f"{ENV_VAR}=cpu")
    setting("triton")
    assert choose(x) == Choice("triton", f"{ENV_VAR}=triton")
    setting("gpu")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of .*got 'gpu'"):
        choose(x)


def test_forced_path_that_cannot_run_raises_with_the_reason(setting, library, triton_imports) -> None:
    x = torch.zeros(4)
    setting("cpu")
    library(False)
    with pytest.raises(RuntimeError, match=f"^{ENV_VAR}=cpu but the CPU library could not be built: {NO_LIBRARY}$"):
        choose(x)
    library(True)
    with pytest.raises(RuntimeError, match=f"^{ENV_VAR}=cpu but the tensor is on cuda:0$"):
        choose(CUDA)
    setting("triton")
    triton_imports(True, interpret=False)
    with pytest.raises(RuntimeError, match=f"^{ENV_VAR}=triton but a cpu tensor needs TRITON_INTERPRET=1$"):
        choose(x)
    triton_imports(False, interpret=True)
    with pytest.raises(RuntimeError, match="triton does not import .*No module named 'triton'"):
        choose(CUDA)


def test_library_wanted(setting) -> None:
    for value, wanted in (("auto", True), ("cpu", True), (" Torch ", False), ("triton", False), ("", True)):
        setting(value)
        assert _dispatch.library_wanted() is wanted, value
    setting("torch")
    assert cpu.prepare() is False  # nothing is built when the ops would not use it


# ----- what the op has --------------------------------------------------------------------------
def test_op_without_a_kernel_on_the_path_runs_its_twin(setting, library, triton_imports) -> None:
    x = torch.zeros(4)
    library(True)
    triton_imports(True, interpret=True)
    setting("cpu")
    assert choose(x, paths=("triton",)) == Choice("torch", "the op has no C kernel")
    setting("triton")
    assert choose(x, paths=("cpu",)) == Choice("torch", "the op has no Triton kernel")
    assert choose(x, paths=("cpu", "triton")).path == "triton"


def test_layout_that_does_not_fit_runs_the_twin(setting, library) -> None:
    x = torch.zeros(4)
    library(True)
    setting("cpu")
    assert choose(x, fits=False) == Choice("torch", "the op's C kernel does not take these tensors' layout")
    assert choose(x, fits=lambda: True).path == "cpu"
    # the layout is looked at only when a compiled path would run
    setting("torch")
    assert choose(x, fits=lambda: pytest.fail("fits was called")).path == "torch"
    setting("cpu")
    assert choose(x, paths=(), fits=lambda: pytest.fail("fits was called")).path == "torch"


def test_implementation_is_the_module_of_the_chosen_path(setting, library, triton_imports) -> None:
    x = torch.zeros(4)
    library(True)
    setting("cpu")
    assert implementation(x) is cpu
    assert implementation(x, cpu="cpu_multi") is cpu_multi
    assert implementation(x, triton="triton_topk", cpu=None) is None
    assert implementation(x, fits=False) is None
    setting("torch")
    assert implementation(x, triton="triton_topk") is None
    triton_topk = pytest.importorskip("lightning_compress_kernels.triton_topk")  # imported in the session's Triton mode
    triton_imports(True, interpret=True)
    setting("triton")
    assert implementation(x, triton="triton_topk") is triton_topk
    assert implementation(x) is None  # an op with only a C kernel


# ----- every op asks the dispatcher -------------------------------------------------------------
def _every_op():
    x, u = torch.randn(64), torch.empty(64)
    code = sign.sign_ef_torch(x, None, 8)
    q = qsgd.qsgd_encode_torch(x, 2, 8, 0)
    wire = torch.zeros(64, dtype=torch.uint8)
    return {
        "sign_ef": lambda: sign.sign_ef(x, block=8),
        "sign_decode_add": lambda: sign.sign_decode_add([code.scales], [code.packed], u, block=8),
        "sign_server_step": lambda: sign.sign_server_step(
            [code.scales], [code.packed], x, block=8, server_error_out=u
        ),
        "sign_ef_multi": lambda: sign.sign_ef_multi([x], [None], [None], wire, [0], blocks=[8]),
        "sign_decode_multi": lambda: sign.sign_decode_multi([wire], [0], [u], blocks=[8]),
        "qsgd_encode": lambda: qsgd.qsgd_encode(x, bits=2, block=8, seed=0),
        "qsgd_decode_add": lambda: qsgd.qsgd_decode_add([q.norms], [q.signs], [q.codes], u, bits=2, block=8),
        "topk_ef": lambda: topk.topk_ef(x, k=3),
        "scatter_add": lambda: topk.scatter_add([x[:2]], [torch.tensor([0, 1])], u),
        "topk_ef_multi": lambda: topk.topk_ef_multi([x], [None], [None], [3], wire, [0], seeds=[0]),
        "sparse_decode_multi": lambda: topk.sparse_decode_multi([wire], [0], [3], [u]),
        "velocity": lambda: velocity.velocity(x, None, None, u, torch.empty(64), xs=1.0, m=0.9, a0=1.0, a1=1.0,
                                              c=1.0, lookahead=False),  # fmt: skip
        "all_finite": lambda: finite.all_finite(x),
    }


def test_every_op_raises_the_reason_of_a_forced_path(setting, library) -> None:
    setting("cpu")
    library(False)
    for name, op in _every_op().items():
        with pytest.raises(RuntimeError, match="CPU library could not be built: no C compiler"):
            op()
            pytest.fail(f"{name} did not ask the dispatcher")


def test_without_the_library_every_op_runs_its_twin(setting, library, monkeypatch) -> None:
    setting("auto")
    library(False)
    for module in (cpu, cpu_multi):
        ops = [n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__]
        for name in set(ops) - {"available", "build_error"}:
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"C kernel {_name} ran"))
    for op in _every_op().values():
        op()
    x = torch.randn(64)
    assert torch.equal(sign.sign_ef(x, block=8).packed, sign.sign_ef_torch(x, None, 8).packed)


def test_dtypes_the_c_kernels_do_not_read_never_ask(setting, library) -> None:
    setting("cpu")
    library(False)  # asking would raise
    assert finite.all_finite(torch.ones(8, dtype=torch.bfloat16))
    assert finite.all_finite(torch.ones(16)[::2])
    u, s = torch.empty(8), torch.empty(8)
    velocity.velocity(torch.ones(8, dtype=torch.float16), None, None, u, s, xs=1.0, m=0.9, a0=1.0, a1=1.0, c=1.0,
                      lookahead=False)  # fmt: skip
    assert torch.equal(s, torch.ones(8))


def test_reason_when_no_compiler_exists(tmp_path) -> None:
    code = (
        "import torch\n"
        "from lightning_compress_kernels._dispatch import choose\n"
        "c = choose(torch.zeros(4))\n"
        "assert c.path == 'torch', c\n"
        "assert c.reason.startswith('the C path is unavailable: the CPU library could not be built:'), c.reason\n"
        "assert 'no C compiler' in c.reason, c.reason\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CC": "", "LIGHTNING_COMPRESS_CACHE": str(tmp_path / "cache")}
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
