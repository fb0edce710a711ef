"""Multi-tensor kernel ops (one call per bucket): the C path against the torch twins, and the
statistics the hook reads (NaN marks what must not be sent; overflowing squares saturate)."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_compress_kernels.cpu as cpu
from lightning_compress_kernels._blocks import num_blocks
from lightning_compress_kernels._dispatch import ENV_VAR
from lightning_compress_kernels.sign import _payload_parts, sign_decode_multi, sign_ef_multi, sign_payload_nbytes
from lightning_compress_kernels.topk import _parts, sparse_decode_multi, topk_ef_multi

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"C CPU path unavailable: {cpu.build_error()}")

# Tensors of one "bucket": one element, odd tails, one past the thread split (2**18), blocks of 8 and 1024.
SIZES = (1, 7, 1023, 4097, 300_001, 70_000)
FP32_MAX = torch.finfo(torch.float32).max


def blocks_for(sizes, block):
    return [max(1, min(block, n)) for n in sizes]


def aligned_offsets(nbytes):
    offsets, at = [], 0
    for b in nbytes:
        offsets.append(at)
        at += -(-b // 8) * 8
    return offsets, at


def inputs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) for n in sizes]
    es = [torch.randn(n, generator=g) * 0.1 for n in sizes]
    return xs, es


def run_sign(monkeypatch, path, sizes, block, scale, xs=None, es=None, threads=1):
    monkeypatch.setenv(ENV_VAR, path)
    torch.set_num_threads(threads)
    if xs is None:
        xs, es = inputs(sizes)
    blocks = blocks_for(sizes, block)
    offsets, total = aligned_offsets([sign_payload_nbytes(n, b) for n, b in zip(sizes, blocks)])
    wire = torch.zeros(total, dtype=torch.uint8)
    rs = [torch.full((n,), 9.0) for n in sizes]
    sq, err = sign_ef_multi(xs, es, rs, wire, offsets, blocks=blocks, scale=scale)
    outs = [torch.full((n,), 7.0) for n in sizes]  # assign: old contents must not matter
    sign_decode_multi([wire, wire.clone()], offsets, outs, blocks=blocks, assign=True)
    parts = [_payload_parts(wire, o, n, b) for o, n, b in zip(offsets, sizes, blocks)]
    return parts, sq, err, rs, outs


@needs_cpu
@pytest.mark.parametrize("block", [8, 1024])
@pytest.mark.parametrize("scale", [1.0, 0.5, 1.0 / 3.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_sign_multi_cpu_matches_twin(monkeypatch, block, scale, threads):
    old = torch.get_num_threads()
    try:
        c = run_sign(monkeypatch, "cpu", SIZES, block, scale, threads=threads)
        t = run_sign(monkeypatch, "torch", SIZES, block, scale)
    finally:
        torch.set_num_threads(old)
    for (cs, cb), (ts, tb) in zip(c[0], t[0]):
        assert torch.equal(cb, tb), "sign bits differ"
        torch.testing.assert_close(cs, ts, rtol=1e-5, atol=0)
    torch.testing.assert_close(c[1], t[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c[2], t[2], rtol=1e-3, atol=1e-4)
    for a, b in zip(c[3] + c[4], t[3] + t[4]):  # residuals and decoded sums: scales differ by rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the decode of two copies of the payload is twice the single decode: out = 0 + p + p
    xs, es = inputs(SIZES)
    for x, e, r, out in zip(xs, es, c[3], c[4]):
        v = x * scale + e if scale != 1.0 else x + e
        torch.testing.assert_close(out, 2 * (v - r), rtol=1e-5, atol=1e-6)


def test_sign_multi_twin_means_per_tensor_sign_ef(monkeypatch):
    """The twin: each tensor's payload is sign_ef of scale * x + e, at its offset."""
    from lightning_compress_kernels.sign import sign_ef

    parts, sq, err, rs, _ = run_sign(monkeypatch, "torch", SIZES, 64, 0.25)
    xs, es = inputs(SIZES)
    at = 0
    for (scales, bits), x, e, r, n in zip(parts, xs, es, rs, SIZES):
        block = max(1, min(64, n))
        want_r = torch.empty(n)
        code = sign_ef(x * 0.25, e, block=block, residual_out=want_r)
        assert torch.equal(scales, code.scales) and torch.equal(bits, code.packed) and torch.equal(r, want_r)
        nb = num_blocks(n, block)
        assert torch.equal(sq[at : at + nb], code.sq)
        at += nb


@needs_cpu
@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_sign_multi_marks_what_must_not_be_sent(monkeypatch, path):
    sizes = (64, 64, 64, 64)
    xs = [torch.ones(64), torch.ones(64), torch.ones(64), torch.ones(64)]
    xs[1][3] = float("inf")
    xs[2][5] = float("nan")
    xs[3][:8] = 3e38  # finite values whose block sum |v| overflows
    es = [torch.zeros(64) for _ in sizes]
    _, sq, err, _, _ = run_sign(monkeypatch, path, sizes, 8, 1.0, xs, es)
    per = sq.view(4, 8)
    assert torch.isfinite(per[0]).all()
    assert torch.isnan(per[1, 0]) and torch.isfinite(per[1, 1:]).all(), "only the block with inf"
    assert torch.isnan(per[2, 0]) and torch.isfinite(per[2, 1:]).all()
    assert torch.isnan(per[3, 0]) and torch.isfinite(per[3, 1:]).all()
    assert torch.isnan(err.view(4, 8)[1:, 0]).all()
    # values whose squares overflow fp32 but whose scale does not: finite, saturated statistics
    big = [torch.full((64,), 1e20)]
    _, sq, err, _, _ = run_sign(monkeypatch, path, (64,), 8, 1.0, big, [torch.zeros(64)])
    assert torch.equal(sq, torch.full((8,), FP32_MAX)) and torch.equal(err, torch.zeros(8))


def run_topk(monkeypatch, path, sizes, density, scale, xs=None, es=None, with_residual_out=True, threads=1):
    monkeypatch.setenv(ENV_VAR, path)
    torch.set_num_threads(threads)
    if xs is None:
        xs, es = inputs(sizes, seed=3)
    ks = [max(1, math.ceil(density * n)) for n in sizes]
    offsets, total = aligned_offsets([8 * k for k in ks])
    wire = torch.zeros(total, dtype=torch.uint8)
    rs = [torch.full((n,), 9.0) if with_residual_out else None for n in sizes]
    sq, err = topk_ef_multi(xs, es, rs, ks, wire, offsets, scale=scale, seeds=list(range(len(sizes))))
    outs = [torch.full((n,), 7.0) for n in sizes]
    sparse_decode_multi([wire, wire.clone()], offsets, ks, outs, assign=True)
    return [_parts(wire, o, k) for o, k in zip(offsets, ks)], sq, err, rs, outs


@needs_cpu
@pytest.mark.parametrize("density", [0.01, 0.3])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("threads", [1, 2])
def test_topk_multi_cpu_matches_twin(monkeypatch, density, scale, threads):
    old = torch.get_num_threads()
    try:
        c = run_topk(monkeypatch, "cpu", SIZES, density, scale, threads=threads)
        t = run_topk(monkeypatch, "torch", SIZES, density, scale)
    finally:
        torch.set_num_threads(old)
    for (cv, ci), (tv, ti) in zip(c[0], t[0]):  # distinct random values: the same set, ascending
        assert torch.equal(ci, ti) and torch.equal(cv, tv)
    for a, b in zip(c[3] + c[4], t[3] + t[4]):
        assert torch.equal(a, b)
    torch.testing.assert_close(c[1], t[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c[2], t[2], rtol=1e-3, atol=1e-4)


@needs_cpu
def test_topk_multi_without_residual_out_keeps_inputs(monkeypatch):
    xs, es = inputs(SIZES, seed=5)
    copies = [x.clone() for x in xs], [e.clone() for e in es]
    c = run_topk(monkeypatch, "cpu", SIZES, 0.01, 0.5, xs, es, with_residual_out=False)
    t = run_topk(monkeypatch, "torch", SIZES, 0.01, 0.5, xs, es, with_residual_out=False)
    assert all(torch.equal(a, b) for a, b in zip(xs + es, copies[0] + copies[1]))
    for (cv, ci), (tv, ti) in zip(c[0], t[0]):
        assert torch.equal(ci, ti) and torch.equal(cv, tv)


@needs_cpu
def test_topk_multi_ties_keep_an_exact_top_k_lowest_index_first(monkeypatch):
    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        n = int(torch.randint(2, 60_000, (1,), generator=g))
        x = torch.randint(-4, 5, (n,), generator=g).float()  # many equal magnitudes
        k = max(1, int(n * 0.2 * float(torch.rand(1, generator=g))))
        [(vals, idx)], _, _, rs, _ = run_topk(monkeypatch, "cpu", (n,), k / n, 1.0, [x], [None])
        idx = idx.long()
        assert idx.numel() == max(1, math.ceil(k / n * n)) and bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(vals, x[idx])
        rest = torch.ones(n, dtype=torch.bool)
        rest[idx] = False
        if rest.any():
            kth = float(x[idx].abs().min())
            assert float(x[rest].abs().max()) <= kth
            # among entries equal to the k-th magnitude, the lowest indices were kept
            tied = (x.abs() == kth).nonzero().reshape(-1)
            kept_tied = idx[x[idx].abs() == kth]
            assert torch.equal(kept_tied, tied[: kept_tied.numel()])
        want = x.clone()
        want[idx] = 0
        assert torch.equal(rs[0], want)


@needs_cpu
@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_topk_multi_marks_non_finite_and_saturates_squares(monkeypatch, path):
    sizes = (5000, 5000, 5000)
    xs, es = inputs(sizes, seed=2)
    xs[1][17] = float("nan")
    xs[2][:] = 1e20  # squares overflow, values do not
    _, sq, err, _, _ = run_topk(monkeypatch, path, sizes, 0.01, 1.0, xs, es)
    assert torch.isfinite(sq[0]) and torch.isnan(sq[1])
    assert sq[2] == FP32_MAX and torch.isfinite(err[2])


@needs_cpu
def test_sparse_decode_refuses_indices_outside_the_tensor(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    wire = torch.zeros(16, dtype=torch.uint8)
    wire[:8].view(torch.float32)[:] = 1.0
    wire[8:].view(torch.int32)[:] = torch.tensor([3, 1000], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="corrupt"):
        sparse_decode_multi([wire], [0], [2], [torch.zeros(10)], assign=True)


# ----- velocity (the optimizer's momentum in the exchange) -----------------------------------------------
VELOCITY_CASES = {
    "sgd-lookahead-wd": dict(xs=0.5, wds=1e-3, m=0.9, a0=1.0, a1=1.0, c=1.0, post=1.0, lookahead=True),
    "sgd-dampening": dict(xs=1 / 3, wds=0.0, m=0.8, a0=1.0, a1=0.7, c=1.0, post=1.0, lookahead=False),
    "adam-lookahead": dict(xs=0.5, wds=0.0, m=0.9, a0=0.1, a1=0.1, c=0.1, post=1 / 0.19, lookahead=True),
}


@needs_cpu
@pytest.mark.parametrize("case", list(VELOCITY_CASES))
@pytest.mark.parametrize("first", [False, True])
def test_velocity_cpu_matches_twin_and_means_the_formula(monkeypatch, case, first):
    from lightning_compress_kernels.velocity import velocity

    k = VELOCITY_CASES[case]
    g = torch.Generator().manual_seed(4)
    grad, p, old = (torch.randn(300_001, generator=g) for _ in range(3))
    out = {}
    for path in ("cpu", "torch"):
        monkeypatch.setenv(ENV_VAR, path)
        u, s = torch.empty_like(grad), torch.empty_like(grad)
        velocity(grad, p if k["wds"] else None, None if first else old, u, s, **k)
        out[path] = (u, s)
    assert torch.equal(out["cpu"][0], out["torch"][0]) and torch.equal(out["cpu"][1], out["torch"][1])
    x = grad.double() * k["xs"] + (p.double() * k["wds"] if k["wds"] else 0)
    u = x * k["a0"] if first else old.double() * k["m"] + x * k["a1"]
    s = (u * k["m"] + x * k["c"] if k["lookahead"] else u) * k["post"]
    # fp32 rounds each product and sum once: a few units of the last place of the largest term (times post)
    ulp = 2.0**-23
    bound_u = 4 * ulp * float((old.double().abs() * k["m"] + x.abs()).max() if not first else x.abs().max())
    torch.testing.assert_close(out["cpu"][0].double(), u, rtol=0, atol=bound_u)
    terms = u.abs() * k["m"] + x.abs() * k["c"] if k["lookahead"] else u.abs()
    torch.testing.assert_close(out["cpu"][1].double(), s, rtol=0, atol=4 * ulp * float(terms.max()) * k["post"] + bound_u)


@needs_cpu
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_multi_ops_with_velocity_equal_velocity_then_op(monkeypatch, path, first, offset):
    """sign_ef_multi and topk_ef_multi with a velocity: the bits of kernels.velocity then the op on s.

    The new velocity and residual go out by non-temporal stores where they start on 32 bytes
    (``offset`` 0), by plain stores otherwise (views one float in): the same bits either way."""
    from lightning_compress_kernels.velocity import Velocity, velocity

    def out_buffer(n):
        return torch.empty(n + offset)[offset:]

    monkeypatch.setenv(ENV_VAR, path)
    g = torch.Generator().manual_seed(9)
    sizes = (7, 1023, 4097, 300_001)
    grad, p, old, e = ([torch.randn(n, generator=g) for n in sizes] for _ in range(4))
    k = dict(xs=0.5, wds=1e-3, m=0.9, a0=1.0, a1=1.0, c=1.0, post=1.0, lookahead=True)
    u_ref, s = [torch.empty(n) for n in sizes], [torch.empty(n) for n in sizes]
    for t in range(len(sizes)):
        velocity(grad[t], p[t], None if first else old[t], u_ref[t], s[t], **k)
    blocks = blocks_for(sizes, 64)
    offsets, total = aligned_offsets([sign_payload_nbytes(n, b) for n, b in zip(sizes, blocks)])
    runs = []
    for fused in (True, False):
        u = [out_buffer(n) for n in sizes]
        r, wire = [out_buffer(n) for n in sizes], torch.zeros(total, dtype=torch.uint8)
        spec = Velocity(p, [None] * 4 if first else old, u, **k)
        if fused:
            out = sign_ef_multi(grad, e, r, wire, offsets, blocks=blocks, velocity=spec)
        else:
            out = sign_ef_multi(s, e, r, wire, offsets, blocks=blocks)
            u = u_ref
        runs.append((wire, r, u, out))
    (w1, r1, u1, o1), (w2, r2, u2, o2) = runs
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(r1 + u1, r2 + u2))
    assert torch.equal(o1[0], o2[0]) and torch.equal(o1[1], o2[1])
    ks = [max(1, math.ceil(0.01 * n)) for n in sizes]
    toffsets, ttotal = aligned_offsets([8 * kk for kk in ks])
    runs = []
    for fused in (True, False):
        u = [out_buffer(n) for n in sizes]
        r, wire = [out_buffer(n) for n in sizes], torch.zeros(ttotal, dtype=torch.uint8)
        spec = Velocity(p, [None] * 4 if first else old, u, **k)
        if fused:
            out = topk_ef_multi(grad, e, r, ks, wire, toffsets, seeds=[1, 2, 3, 4], velocity=spec)
        else:
            out = topk_ef_multi(s, e, r, ks, wire, toffsets, seeds=[1, 2, 3, 4])
            u = u_ref
        runs.append((wire, r, u, out))
    (w1, r1, u1, o1), (w2, r2, u2, o2) = runs
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(r1 + u1, r2 + u2))
    assert torch.equal(o1[0], o2[0])
