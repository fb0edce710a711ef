"""Kernel ops (kernels/): the meaning of the torch twins, and the C CPU path against them.

The Triton kernels are checked against the same twins in test_kernels_triton.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lightning_compress_kernels.cpu as cpu
from lightning_compress_kernels import qsgd, rng, sign, topk
from lightning_compress_kernels._dispatch import ENV_VAR, path_for
from lightning_compress_kernels.bitpack import unpack_bits

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"C CPU path unavailable: {cpu.build_error()}")

# Lengths with tails that are not a multiple of the block, one below and one above the
# size where the CPU path splits work over threads (2**18).
LENGTHS = (1, 7, 8, 1000, 1027, 4099, 300_001)
BLOCKS = (8, 64, 1024)


def data(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def on_path(monkeypatch):
    def use(path: str) -> None:
        monkeypatch.setenv(ENV_VAR, path)

    return use


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def call_counter(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


# ----- counter-based generator ------------------------------------------------------------
def _lowbias32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) % 2**32
    h ^= h >> 15
    h = (h * 0x846CA68B) % 2**32
    return h ^ (h >> 16)


def test_uniform_matches_integer_reference() -> None:
    seed = 0xDEADBEEF12345
    k0, k1 = rng.stream_keys(seed)
    expected = []
    for i in (0, 1, 2, 2**31 + 5, 2**32 - 1):
        h = _lowbias32(_lowbias32((i * 0x9E3779B9 + k0) % 2**32) ^ k1)
        expected.append((h >> 8) / 2**24)
    got = [float(rng.uniform(seed, 1, offset=i)[0]) for i in (0, 1, 2, 2**31 + 5, 2**32 - 1)]
    assert got == expected


def test_uniform_streams() -> None:
    u = rng.uniform(7, 200_000)
    assert torch.equal(u, rng.uniform(7, 200_000))
    assert torch.equal(u[1000:1010], rng.uniform(7, 10, offset=1000))
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # multiples of 2**-24: exact in fp32
    assert abs(float(u.mean()) - 0.5) < 0.003 and abs(float(u.var()) - 1 / 12) < 0.002
    other = rng.uniform(8, 200_000)
    assert not torch.equal(u, other)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < 0.01


# ----- sign: twin meaning -----------------------------------------------------------------
def test_sign_twin_meaning(on_path) -> None:
    on_path("torch")
    x = torch.tensor([1.0, -3.0, 0.0, -0.0, 2.0, -2.0, 4.0, 0.5, -1.5])
    res = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -8.0, 0.0, 0.0])
    out = torch.empty(9)
    code = sign.sign_ef(x, res, block=8, residual_out=out)
    v = x + res  # [1, -2, 0, -0, 2, -2, -4, 0.5 | -1.5]
    assert torch.allclose(code.scales, torch.tensor([11.5 / 8, 1.5]))
    assert torch.allclose(code.sq, torch.tensor([29.25, 2.25]))
    bits = unpack_bits(code.packed, 1, 9)
    assert bits.tolist() == [1, 0, 1, 1, 1, 0, 0, 1, 0]  # -0.0 >= 0 encodes as +
    s = code.scales.repeat_interleave(8)[:9]
    assert torch.equal(out, v - torch.where(bits.bool(), s, -s))
    dec = sign.sign_decode_add([code.scales], [code.packed], torch.zeros(9), block=8)
    assert torch.equal(dec, v - out)


# ----- sign: CPU path against the twin ---------------------------------------------------
def _sign_both(on_path, x, res, block):
    on_path("torch")
    r_t = torch.empty_like(x)
    twin = sign.sign_ef(x, res, block=block, residual_out=r_t)
    on_path("cpu")
    r_c = torch.empty_like(x)
    fast = sign.sign_ef(x, res, block=block, residual_out=r_c)
    return twin, r_t, fast, r_c


def _assert_sign_close(twin, r_t, fast, r_c) -> None:
    assert torch.equal(twin.packed, fast.packed)
    torch.testing.assert_close(fast.scales, twin.scales, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.sq, twin.sq, rtol=1e-5, atol=0)
    # residual = v -/+ scale: it differs only through the scale's rounding.
    atol = 2e-6 * float(twin.scales.abs().max()) if twin.scales.numel() else 0.0
    torch.testing.assert_close(r_c, r_t, rtol=1e-6, atol=atol)


@needs_cpu
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", LENGTHS)
def test_sign_cpu_matches_twin(on_path, monkeypatch, two_threads, n: int, block: int) -> None:
    calls = call_counter(monkeypatch, cpu, "sign_ef")
    x, res = data(n, 1), data(n, 2, 0.1)
    _assert_sign_close(*_sign_both(on_path, x, res, block))
    _assert_sign_close(*_sign_both(on_path, x, None, block))
    assert len(calls) == 2  # the CPU library ran, not a silent fallback


@needs_cpu
def test_sign_cpu_residual_in_place(on_path) -> None:
    x, res = data(5000, 3), data(5000, 4)
    on_path("torch")
    r_t = torch.empty(5000)
    twin = sign.sign_ef(x, res, block=64, residual_out=r_t)
    on_path("cpu")
    res_c = res.clone()
    fast = sign.sign_ef(x, res_c, block=64, residual_out=res_c)  # new residual over the old one
    _assert_sign_close(twin, r_t, fast, res_c)


@needs_cpu
def test_sign_cpu_special_values(on_path) -> None:
    n = 64 * 6
    x = data(n, 5)
    x[:64] = 0.0  # an all-zero block
    x[64:128] = -0.0  # all negative zeros: every bit set (-0.0 >= 0)
    x[128:192] *= 1e30
    x[192:256] = torch.tensor(3e38) * torch.sign(x[192:256])  # |v| near fp32 max; sum overflows to inf
    x[256:320] *= 1e-40  # subnormals
    x[320:] *= 1e-30
    twin, r_t, fast, r_c = _sign_both(on_path, x, None, 64)
    assert torch.equal(twin.packed, fast.packed)
    assert bool((unpack_bits(fast.packed, 1, n)[64:128] == 1).all())
    assert float(fast.scales[0]) == 0.0 and float(fast.scales[1]) == 0.0
    assert bool(torch.isinf(fast.sq[3])) and bool(torch.isinf(twin.sq[3]))  # the stated overflow
    finite = [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(fast.scales[finite], twin.scales[finite], rtol=1e-5, atol=0)


@needs_cpu
@pytest.mark.parametrize("bad", (float("inf"), float("-inf"), float("nan")))
def test_sign_cpu_non_finite_policy(on_path, bad: float) -> None:
    x = data(256, 6)
    x[70] = bad  # block 1 of 4 (block 64)
    twin, r_t, fast, r_c = _sign_both(on_path, x, None, 64)
    for code in (twin, fast):
        assert not bool(torch.isfinite(code.scales[1]))
        assert bool(torch.isfinite(code.scales[[0, 2, 3]]).all())
    assert torch.equal(twin.packed, fast.packed)  # NaN encodes as - on both paths
    keep = torch.cat([torch.arange(0, 64), torch.arange(128, 256)])
    torch.testing.assert_close(r_c[keep], r_t[keep], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fast.scales[[0, 2, 3]], twin.scales[[0, 2, 3]], rtol=1e-5, atol=0)


@needs_cpu
@pytest.mark.parametrize("n,block", [(1027, 8), (4099, 1024), (300_001, 1024)])
def test_sign_decode_add_and_server_step_exact(on_path, two_threads, n: int, block: int) -> None:
    codes = [sign.sign_ef(data(n, 10 + r), block=block) for r in range(3)]
    scales, packed = [c.scales for c in codes], [c.packed for c in codes]
    base = data(n, 20)
    on_path("torch")
    twin = sign.sign_decode_add(scales, packed, base.clone(), block=block)
    on_path("cpu")
    fast = sign.sign_decode_add(scales, packed, base.clone(), block=block)
    assert torch.equal(twin, fast)  # sums of +-scale in the same order: exact
    err_t, err_c = torch.empty(n), torch.empty(n)
    on_path("torch")
    st = sign.sign_server_step(scales, packed, base, block=block, server_error_out=err_t)
    on_path("cpu")
    sc = sign.sign_server_step(scales, packed, base, block=block, server_error_out=err_c)
    _assert_sign_close(st, err_t, sc, err_c)


def test_unaligned_blocks_use_the_twin(on_path, monkeypatch) -> None:
    calls = call_counter(monkeypatch, cpu, "sign_ef")
    on_path("auto")
    x = data(3003, 7)
    code = sign.sign_ef(x, block=1001)  # blocks start mid-byte: no kernel packs them independently
    assert calls == []
    assert torch.equal(code.packed, sign.sign_ef_torch(x, None, 1001).packed)


# ----- QSGD ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_qsgd_twin_unbiased_and_seeded(on_path, bits: int) -> None:
    on_path("torch")
    x = data(512, 8)
    trials = 400
    acc = torch.zeros(512)
    for s in range(trials):
        c = qsgd.qsgd_encode(x, bits=bits, block=128, seed=s)
        qsgd.qsgd_decode_add([c.norms], [c.signs], [c.codes], acc, bits=bits, block=128)
    # E[Q(x)] = x; per-element std of the mean is below norm/(s*sqrt(trials)).
    norms = torch.linalg.vector_norm(x.view(4, 128), dim=1).repeat_interleave(128)
    tol = 5 * norms / ((1 << bits) - 1) / trials**0.5
    assert bool(((acc / trials - x).abs() <= tol).all())
    a, b = qsgd.qsgd_encode(x, bits=bits, block=128, seed=3), qsgd.qsgd_encode(x, bits=bits, block=128, seed=3)
    assert torch.equal(a.codes, b.codes)


@needs_cpu
@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("n,block", [(7, 8), (1027, 64), (4099, 1024), (300_001, 1024)])
def test_qsgd_cpu_matches_twin(on_path, monkeypatch, two_threads, bits: int, n: int, block: int) -> None:
    calls = call_counter(monkeypatch, cpu, "qsgd_encode")
    x = data(n, 9)
    x[: min(n, block)] *= 1e-35  # a block of tiny magnitudes: squares would underflow
    on_path("torch")
    twin = qsgd.qsgd_encode(x, bits=bits, block=block, seed=12345)
    on_path("cpu")
    fast = qsgd.qsgd_encode(x, bits=bits, block=block, seed=12345)
    assert calls == ["qsgd_encode"]
    assert torch.equal(twin.signs, fast.signs)
    torch.testing.assert_close(fast.norms, twin.norms, rtol=1e-5, atol=0)
    lt, lf = unpack_bits(twin.codes, bits, n).int(), unpack_bits(fast.codes, bits, n).int()
    differ = lt != lf
    assert int(differ.sum()) <= max(1, n // 10_000)  # only where rounding lands on an integer
    assert int((lt - lf).abs().max()) <= 1
    out_t, out_c = data(n, 1), data(n, 1)
    on_path("torch")
    qsgd.qsgd_decode_add([twin.norms] * 2, [twin.signs] * 2, [twin.codes] * 2, out_t, bits=bits, block=block)
    on_path("cpu")
    qsgd.qsgd_decode_add([twin.norms] * 2, [twin.signs] * 2, [twin.codes] * 2, out_c, bits=bits, block=block)
    assert torch.equal(out_t, out_c)


@needs_cpu
def test_qsgd_cpu_special_values(on_path) -> None:
    x = data(64 * 4, 11)
    x[:64] = 0.0
    x[64:128] *= 1e30
    x[200] = float("nan")
    on_path("cpu")
    c = qsgd.qsgd_encode(x, bits=4, block=64, seed=1)
    assert float(c.norms[0]) == 0.0 and bool((unpack_bits(c.codes, 4, 256)[:64] == 0).all())
    assert bool(torch.isfinite(c.norms[:3]).all()) and not bool(torch.isfinite(c.norms[3]))
    on_path("torch")
    t = qsgd.qsgd_encode(x, bits=4, block=64, seed=1)
    assert not bool(torch.isfinite(t.norms[3]))
    torch.testing.assert_close(c.norms[:3], t.norms[:3], rtol=1e-5, atol=0)


# ----- top-k -----------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("n,k", [(1, 1), (1000, 10), (4099, 1), (300_001, 3000), (300_001, 1), (300_001, 70_000)])
def test_topk_cpu_matches_twin(on_path, monkeypatch, two_threads, n: int, k: int) -> None:
    select = call_counter(monkeypatch, cpu, "select_at_least")
    x, res = data(n, 12), data(n, 13, 0.5)
    on_path("torch")
    r_t = torch.empty(n)
    twin = topk.topk_ef(x, res, k=k, residual_out=r_t, seed=4)
    on_path("cpu")
    r_c = torch.empty(n)
    fast = topk.topk_ef(x, res, k=k, residual_out=r_c, seed=4)
    assert torch.equal(twin.indices, fast.indices)
    assert bool((fast.indices[1:] > fast.indices[:-1]).all())  # ascending
    assert torch.equal(twin.values, fast.values)
    assert torch.equal(r_t, r_c)
    torch.testing.assert_close(fast.sq, twin.sq, rtol=1e-5, atol=0)
    sampled = n > 4 * 4096 and 4 * k < n
    assert len(select) == (1 if sampled else 0)


@needs_cpu
def test_topk_ties_give_a_valid_topk_set(on_path) -> None:
    x = torch.randint(-3, 4, (100_000,), generator=torch.Generator().manual_seed(1)).float()
    on_path("cpu")
    k = 5000
    code = topk.topk_ef(x, k=k, seed=2)
    kept = torch.zeros(100_000, dtype=torch.bool)
    kept[code.indices.long()] = True
    assert int(kept.sum()) == k
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


@needs_cpu
def test_topk_falls_back_when_too_few_pass(on_path, monkeypatch) -> None:
    # A threshold above everything: no candidate passes, the exact selection takes over.
    monkeypatch.setattr(topk, "sample_threshold", lambda *a, **k: 1e30)
    x = data(100_000, 14)
    on_path("cpu")
    fast = topk.topk_ef(x, k=100)
    assert torch.equal(fast.indices, topk.topk_ef_torch(x, None, 100).indices)


def test_scatter_add_in_order(on_path) -> None:
    on_path("auto")
    out = torch.zeros(10)
    topk.scatter_add([torch.tensor([1.0, 2.0]), torch.tensor([10.0])], [torch.tensor([3, 0]), torch.tensor([3])], out)
    assert out.tolist() == [2.0, 0, 0, 11.0, 0, 0, 0, 0, 0, 0]


# ----- dispatch -------------------------------------------------------------------------------
def test_dispatch_env(monkeypatch) -> None:
    x = torch.zeros(4)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert path_for(x) == "torch"
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=ENV_VAR):
        path_for(x)
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        path_for(x)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert path_for(x) == ("cpu" if cpu.available() else "torch")


def test_no_compiler_falls_back_to_twins(tmp_path) -> None:
    code = (
        "import torch, lightning_compress_kernels.cpu as c; from lightning_compress_kernels import sign, _dispatch\n"
        "assert not c.available(), 'built without a compiler?'\n"
        "assert 'no C compiler' in c.build_error()\n"
        "x = torch.randn(100)\n"
        "assert _dispatch.path_for(x) == 'torch'\n"
        "assert torch.equal(sign.sign_ef(x, block=8).packed, sign.sign_ef_torch(x, None, 8).packed)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CC": "", "LIGHTNING_COMPRESS_CACHE": str(tmp_path / "cache")}
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----- finiteness check ------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("n", (1, 15, 16, 17, 300_001))
def test_all_finite_cpu_matches_twin(on_path, two_threads, n: int) -> None:
    from lightning_compress_kernels.finite import all_finite

    on_path("cpu")
    x = data(n, 21)
    assert all_finite(x)
    for bad in (float("inf"), float("-inf"), float("nan")):
        for where in {0, n // 2, n - 1}:
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
    y = x.clone()
    y[-1] = 3.4e38  # the largest finite magnitudes are finite
    assert all_finite(y) and all_finite(torch.tensor([1e-45, -0.0]))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))  # other dtypes: the twin
