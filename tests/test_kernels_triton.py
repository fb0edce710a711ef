"""The Triton kernels (kernels/triton_*.py) against the torch twins, through the public dispatchers.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set below before triton or the kernels are imported); with ``TRITON_INTERPRET=0`` set on a CUDA
machine the same tests run the compiled kernels on the GPU. Every test forces
``LIGHTNING_COMPRESS_KERNELS=triton`` and counts the calls into the Triton modules, so a
silent fallback to the twin cannot pass. Sizes are small: the interpreter is slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also set by tests/conftest.py, before lightning imports triton

import collections  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language  # noqa: E402, F811  (the submodule, loaded before the kernels)

from lightning_compress_kernels import qsgd, sign, topk, triton_blocks, triton_qsgd, triton_sign, triton_topk  # noqa: E402
from lightning_compress_kernels._blocks import num_blocks  # noqa: E402
from lightning_compress_kernels.bitpack import unpack_bits  # noqa: E402
from lightning_compress_kernels.rng import uniform  # noqa: E402


def _interpreted(fn) -> bool:
    return "Interpreted" in type(fn).__name__


# The mode is fixed when a jit'd function is defined, and triton's own library functions
# (tl.max, tl.cumsum, ...) when triton is first imported; tests/conftest.py sets
# TRITON_INTERPRET=1 on machines without CUDA before anything imports triton.
INTERPRET = _interpreted(triton.language.max)
if INTERPRET != _interpreted(triton_sign._sign_encode_kernel):
    raise RuntimeError("triton was imported before TRITON_INTERPRET was set; run pytest from the repository root")
if not INTERPRET and not torch.cuda.is_available():
    raise RuntimeError("TRITON_INTERPRET=0 without a CUDA device: the Triton kernels cannot run here")
DEVICE = "cpu" if INTERPRET else "cuda"


RTOL = 1e-5
# numpy, under the interpreter, warns where special values overflow or turn into NaN on purpose
NONFINITE = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# (n, block): odd lengths, tails shorter than a block, one block, block > n, blocks that are
# not powers of two, and many short blocks grouped per program.
SHAPES = [(1, 8), (7, 8), (8, 8), (1000, 64), (1027, 128), (3000, 1024), (1000, 1027), (1003, 24), (3000, 8)]


@pytest.fixture
def calls(monkeypatch):
    """Force the Triton path and count calls into the Triton modules' public functions."""
    monkeypatch.setenv("LIGHTNING_COMPRESS_KERNELS", "triton")
    counts: collections.Counter = collections.Counter()
    for mod in (triton_sign, triton_qsgd, triton_topk):
        for name in mod.__all__:
            fn = getattr(mod, name)

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                counts[_name] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(mod, name, wrapped)
    return counts


def _randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * scale).to(DEVICE)


def _per_elem(per_block: torch.Tensor, n: int, block: int) -> torch.Tensor:
    return per_block.repeat_interleave(block)[:n]


def _assert_residual(got, want, scales, n, block):
    """Residuals agree to fp32 rounding of the block scale: atol scaled by ``scale_b``."""
    atol = _per_elem(scales.abs(), n, block) * RTOL
    diff = (got - want).abs()
    bad = diff > atol + RTOL * want.abs()
    assert not bad.any(), f"{int(bad.sum())} residual entries differ, max {float(diff.max())}"


def _special(n: int, block: int) -> torch.Tensor:
    """Random data with special blocks: all zeros, +-0.0, huge, tiny and subnormal values."""
    x = _randn(n, 7).cpu()
    nb = num_blocks(n, block)
    views = [x[b * block : (b + 1) * block] for b in range(nb)]
    fills = [
        lambda v: v.zero_(),
        lambda v: v.copy_(torch.where(torch.arange(v.numel()) % 2 == 0, 0.0, -0.0)),
        lambda v: v.mul_(1e30),
        lambda v: (v.mul_(1e-3), v.__setitem__(0, -3e38)),
        lambda v: v.mul_(1e-30),
        lambda v: v.copy_(torch.where(v > 0, 1e-40, -1e-40) * (torch.arange(v.numel()) % 3)),
    ]
    for view, fill in zip(views, fills):
        fill(view)
    return x.to(DEVICE)


# ----- RNG -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 5, 2**63 + 11, -7])
def test_triton_rng_equals_torch_rng_bit_for_bit(seed):
    got = triton_qsgd.uniform(seed, 3000, DEVICE)
    assert torch.equal(got, uniform(seed, 3000, DEVICE))
    # counters wrap modulo 2**32
    got = triton_qsgd.uniform(seed, 300, DEVICE, offset=2**32 - 100)
    assert torch.equal(got, uniform(seed, 300, DEVICE, offset=2**32 - 100))
    assert not torch.equal(got, uniform(seed + 1, 300, DEVICE, offset=2**32 - 100))


# ----- sign ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_sign_ef_matches_twin(calls, n, block, with_residual):
    x = _randn(n, n + block)
    residual = _randn(n, 1, 0.5) if with_residual else None
    res_out, res_twin = torch.empty_like(x), torch.empty_like(x)
    got = sign.sign_ef(x, residual, block=block, residual_out=res_out)
    want = sign.sign_ef_torch(x, residual, block, res_twin)
    assert calls["sign_ef"] == 1
    assert got.packed.dtype == torch.uint8 and got.packed.numel() == -(-n // 8)
    assert torch.equal(got.packed, want.packed)
    torch.testing.assert_close(got.scales, want.scales, rtol=RTOL, atol=0)
    torch.testing.assert_close(got.sq, want.sq, rtol=RTOL, atol=0)
    _assert_residual(res_out, res_twin, want.scales, n, block)
    # without residual_out: the same code, no residual written
    again = sign.sign_ef(x, residual, block=block)
    assert torch.equal(again.packed, got.packed) and torch.equal(again.scales, got.scales)


def test_sign_ef_in_place_residual_and_chunked_blocks(calls, monkeypatch):
    """``residual_out is residual`` (in-place feedback), and blocks longer than a tile, walked
    in chunks (the tile is shrunk so that the interpreter stays fast)."""
    monkeypatch.setattr(triton_blocks, "MAX_TILE", 64)
    for n, block in [(1000, 192), (1027, 256), (500, 1000)]:
        assert not triton_blocks.geometry(n, block)[4]  # really the chunked path
        x, residual = _randn(n, 2), _randn(n, 3)
        res_twin = torch.empty_like(x)
        want = sign.sign_ef_torch(x, residual, block, res_twin)
        got = sign.sign_ef(x, residual, block=block, residual_out=residual)
        assert torch.equal(got.packed, want.packed)
        torch.testing.assert_close(got.scales, want.scales, rtol=RTOL, atol=0)
        torch.testing.assert_close(got.sq, want.sq, rtol=RTOL, atol=0)
        _assert_residual(residual, res_twin, want.scales, n, block)
    assert calls["sign_ef"] == 3


@NONFINITE
@pytest.mark.parametrize("n,block", [(1000, 64), (43, 8)])
def test_sign_ef_special_values(calls, n, block):
    x = _special(n, block)
    res_out, res_twin = torch.empty_like(x), torch.empty_like(x)
    got = sign.sign_ef(x, None, block=block, residual_out=res_out)
    want = sign.sign_ef_torch(x, None, block, res_twin)
    assert calls["sign_ef"] == 1
    assert torch.equal(got.packed, want.packed)
    bits = unpack_bits(got.packed, 1, n)
    assert torch.equal(bits[: min(block, n)], torch.ones(min(block, n), dtype=torch.uint8, device=DEVICE))
    if n > block:  # +0.0 and -0.0 both encode as +
        assert bits[block : 2 * block].all()
    assert got.scales[0] == 0 and got.sq[0] == 0
    torch.testing.assert_close(got.scales, want.scales, rtol=RTOL, atol=0)
    torch.testing.assert_close(got.sq, want.sq, rtol=RTOL, atol=0)  # overflowed sq: inf on both
    assert torch.isfinite(got.scales).all()
    _assert_residual(res_out, res_twin, want.scales, n, block)


@NONFINITE
def test_sign_ef_nonfinite_blocks(calls):
    n, block = 1000, 64
    x = _randn(n, 11)
    x[70] = float("inf")
    x[200] = float("nan")
    x[500], x[501] = float("-inf"), float("inf")
    bad = torch.tensor([1, 3, 7], device=DEVICE)
    res_out, res_twin = torch.empty_like(x), torch.empty_like(x)
    got = sign.sign_ef(x, None, block=block, residual_out=res_out)
    want = sign.sign_ef_torch(x, None, block, res_twin)
    assert calls["sign_ef"] == 1
    assert torch.equal(got.packed, want.packed)  # bits of v >= 0 everywhere, NaN as -
    assert unpack_bits(got.packed, 1, n)[200] == 0
    finite = torch.ones(num_blocks(n, block), dtype=torch.bool, device=DEVICE)
    finite[bad] = False
    assert not torch.isfinite(got.scales[bad]).any()
    torch.testing.assert_close(got.scales[finite], want.scales[finite], rtol=RTOL, atol=0)
    torch.testing.assert_close(got.sq[finite], want.sq[finite], rtol=RTOL, atol=0)
    elem_finite = _per_elem(finite, n, block)
    assert not torch.isfinite(res_out[~elem_finite]).any()
    _assert_residual(res_out[elem_finite], res_twin[elem_finite], want.scales[finite], int(elem_finite.sum()), block)


def _sign_payloads(n, block, count, gathered):
    codes = [sign.sign_ef_torch(_randn(n, 100 + r), None, block) for r in range(count)]
    scales, packed = [c.scales for c in codes], [c.packed for c in codes]
    if gathered and count:  # views into one buffer, as an all-gather delivers them
        flat_s, flat_p = torch.cat(scales), torch.cat(packed)
        nb, nbytes = scales[0].numel(), packed[0].numel()
        scales = [flat_s[r * nb : (r + 1) * nb] for r in range(count)]
        packed = [flat_p[r * nbytes : (r + 1) * nbytes] for r in range(count)]
    return scales, packed


@pytest.mark.parametrize("n,block", [(7, 8), (1027, 128), (3000, 1024), (1003, 24)])
@pytest.mark.parametrize("count,gathered", [(1, False), (3, False), (3, True)])
def test_sign_decode_add_matches_twin(calls, n, block, count, gathered):
    scales, packed = _sign_payloads(n, block, count, gathered)
    out = _randn(n, 5)
    want = sign.sign_decode_add_torch(scales, packed, out.clone(), block)
    got = sign.sign_decode_add(scales, packed, out, block=block)
    assert calls["sign_decode_add"] == 1
    assert got is out
    assert torch.equal(out, want)  # the same adds in the same order


def test_payload_rows_copy_only_when_needed():
    flat = torch.arange(30, dtype=torch.float32, device=DEVICE)
    views = [flat[r * 10 : r * 10 + 8] for r in range(3)]
    rows, stride = triton_blocks.payload_rows(views, 8, torch.float32, flat.device, "t")
    assert stride == 10 and rows.data_ptr() == flat.data_ptr()
    assert torch.equal(rows, torch.stack(views))
    apart = [v.clone() for v in views]
    rows, stride = triton_blocks.payload_rows(apart, 8, torch.float32, flat.device, "t")
    assert stride == 8 and torch.equal(rows, torch.stack(views))
    with pytest.raises(ValueError):
        triton_blocks.payload_rows([flat[:7]], 8, torch.float32, flat.device, "t")


@NONFINITE
def test_sign_decode_add_nonfinite_scale(calls):
    n, block = 1000, 64
    scales, packed = _sign_payloads(n, block, 2, False)
    scales[1][2] = float("inf")
    scales[0][5] = float("nan")
    out = _randn(n, 6)
    want = sign.sign_decode_add_torch(scales, packed, out.clone(), block)
    sign.sign_decode_add(scales, packed, out, block=block)
    assert calls["sign_decode_add"] == 1
    assert not torch.isfinite(out[2 * block : 3 * block]).any()
    assert torch.isnan(out[5 * block : 6 * block]).all()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n,block", [(7, 8), (1027, 128), (3000, 1024), (1003, 24)])
@pytest.mark.parametrize("count", [0, 1, 3])
def test_sign_server_step_matches_twin(calls, n, block, count):
    scales, packed = _sign_payloads(n, block, count, gathered=count == 3)
    server_error = _randn(n, 9, 0.1)
    err_twin = torch.empty_like(server_error)
    want = sign.sign_server_step_torch(scales, packed, server_error, block, err_twin)
    # in place: the new server error overwrites the old one
    got = sign.sign_server_step(scales, packed, server_error, block=block, server_error_out=server_error)
    assert calls["sign_server_step"] == 1
    assert torch.equal(got.packed, want.packed)
    torch.testing.assert_close(got.scales, want.scales, rtol=RTOL, atol=0)
    torch.testing.assert_close(got.sq, want.sq, rtol=RTOL, atol=0)
    _assert_residual(server_error, err_twin, want.scales, n, block)


def test_sign_server_step_chunked(calls, monkeypatch):
    monkeypatch.setattr(triton_blocks, "MAX_TILE", 64)
    n, block = 1000, 192
    scales, packed = _sign_payloads(n, block, 2, gathered=False)
    server_error = _randn(n, 12, 0.1)
    out, err_twin = torch.empty_like(server_error), torch.empty_like(server_error)
    want = sign.sign_server_step_torch(scales, packed, server_error, block, err_twin)
    got = sign.sign_server_step(scales, packed, server_error, block=block, server_error_out=out)
    assert calls["sign_server_step"] == 1
    assert torch.equal(got.packed, want.packed)
    torch.testing.assert_close(got.scales, want.scales, rtol=RTOL, atol=0)
    _assert_residual(out, err_twin, want.scales, n, block)


# ----- qsgd ------------------------------------------------------------------------------
def _assert_levels(got_codes, want_codes, bits, n, keep=None):
    """Levels agree except where one may land on the other side of an integer: a tiny
    fraction may differ, none by more than one."""
    got = unpack_bits(got_codes, bits, n).to(torch.int16)
    want = unpack_bits(want_codes, bits, n).to(torch.int16)
    if keep is not None:
        got, want = got[keep], want[keep]
    diff = (got - want).abs()
    assert diff.numel() == 0 or int(diff.max()) <= 1
    assert int((diff != 0).sum()) <= max(1, diff.numel() // 1000)


def _assert_qsgd(got, want, n, bits):
    torch.testing.assert_close(got.norms, want.norms, rtol=RTOL, atol=0)
    assert torch.equal(got.signs, want.signs)
    assert got.codes.numel() == want.codes.numel() == -(-n * bits // 8)
    _assert_levels(got.codes, want.codes, bits, n)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n,block", SHAPES)
def test_qsgd_encode_matches_twin(calls, bits, n, block):
    x = _randn(n, 3 * n + bits)
    seed = 1000 + bits
    got = qsgd.qsgd_encode(x, bits=bits, block=block, seed=seed)
    want = qsgd.qsgd_encode_torch(x, bits, block, seed)
    assert calls["qsgd_encode"] == 1
    _assert_qsgd(got, want, n, bits)
    if n >= 1000:  # the levels really depend on the seed (the comparison is not vacuous)
        other = qsgd.qsgd_encode_torch(x, bits, block, seed + 1)
        assert not torch.equal(other.codes, got.codes)


@pytest.mark.parametrize("bits", [2, 8])
def test_qsgd_encode_chunked_blocks(calls, monkeypatch, bits):
    monkeypatch.setattr(triton_blocks, "MAX_TILE", 64)  # the tiling both Triton modules share
    for n, block in [(1000, 192), (500, 1000)]:
        assert not triton_blocks.geometry(n, block)[4]
        x = _randn(n, 21)
        got = qsgd.qsgd_encode(x, bits=bits, block=block, seed=2**40 + 3)
        want = qsgd.qsgd_encode_torch(x, bits, block, 2**40 + 3)
        _assert_qsgd(got, want, n, bits)
    assert calls["qsgd_encode"] == 2


@NONFINITE
@pytest.mark.parametrize("bits", [1, 4])
@pytest.mark.parametrize("n,block", [(1000, 64), (43, 8)])
def test_qsgd_encode_special_values(calls, bits, n, block):
    x = _special(n, block)
    got = qsgd.qsgd_encode(x, bits=bits, block=block, seed=77)
    want = qsgd.qsgd_encode_torch(x, bits, block, 77)
    assert calls["qsgd_encode"] == 1
    _assert_qsgd(got, want, n, bits)
    assert got.norms[0] == 0
    assert not unpack_bits(got.codes, bits, n)[: min(block, n)].any()  # a zero block: level 0
    if n > block:
        assert unpack_bits(got.signs, 1, n)[block : 2 * block].all()  # -0.0 >= 0
    assert torch.isfinite(got.norms).all()


@NONFINITE
def test_qsgd_encode_nonfinite_blocks(calls):
    n, block, bits = 1000, 64, 4
    x = _randn(n, 13)
    x[70] = float("inf")
    x[200] = float("nan")
    bad = torch.tensor([1, 3], device=DEVICE)
    got = qsgd.qsgd_encode(x, bits=bits, block=block, seed=3)
    want = qsgd.qsgd_encode_torch(x, bits, block, 3)
    assert calls["qsgd_encode"] == 1
    finite = torch.ones(num_blocks(n, block), dtype=torch.bool, device=DEVICE)
    finite[bad] = False
    assert not torch.isfinite(got.norms[bad]).any()
    torch.testing.assert_close(got.norms[finite], want.norms[finite], rtol=RTOL, atol=0)
    keep = _per_elem(finite, n, block)
    _assert_levels(got.codes, want.codes, bits, n, keep)
    sg, sw = unpack_bits(got.signs, 1, n), unpack_bits(want.signs, 1, n)
    assert torch.equal(sg[keep], sw[keep])


def _qsgd_payloads(n, block, bits, count, gathered):
    codes = [qsgd.qsgd_encode_torch(_randn(n, 200 + r), bits, block, r) for r in range(count)]
    parts = [[c[i] for c in codes] for i in range(3)]
    if gathered:
        for i, part in enumerate(parts):
            flat, size = torch.cat(part), part[0].numel()
            parts[i] = [flat[r * size : (r + 1) * size] for r in range(count)]
    return parts


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n,block,count,gathered", [(7, 8, 1, False), (1027, 128, 3, True), (3000, 1024, 2, False)])
def test_qsgd_decode_add_matches_twin(calls, bits, n, block, count, gathered):
    norms, signs, codes = _qsgd_payloads(n, block, bits, count, gathered)
    out = _randn(n, 8)
    want = qsgd.qsgd_decode_add_torch(norms, signs, codes, out.clone(), bits, block)
    got = qsgd.qsgd_decode_add(norms, signs, codes, out, bits=bits, block=block)
    assert calls["qsgd_decode_add"] == 1
    assert got is out
    scale = sum(_per_elem(nm, n, block) for nm in norms)
    assert ((out - want).abs() <= RTOL * (scale + want.abs())).all()


@NONFINITE
def test_qsgd_decode_add_nonfinite_norm(calls):
    n, block, bits = 1000, 64, 2
    norms, signs, codes = _qsgd_payloads(n, block, bits, 2, False)
    norms[1][4] = float("inf")
    out = _randn(n, 8)
    want = qsgd.qsgd_decode_add_torch(norms, signs, codes, out.clone(), bits, block)
    qsgd.qsgd_decode_add(norms, signs, codes, out, bits=bits, block=block)
    assert calls["qsgd_decode_add"] == 1
    blk = out[4 * block : 5 * block]
    levels = unpack_bits(codes[1], bits, n)[4 * block : 5 * block]
    assert not torch.isfinite(blk[levels != 0]).any()
    torch.testing.assert_close(out, want, rtol=RTOL, atol=RTOL, equal_nan=True)


def test_decode_add_chunked_blocks(calls, monkeypatch):
    """Decoding blocks longer than a tile: a program per chunk of a block."""
    monkeypatch.setattr(triton_blocks, "MAX_TILE", 64)
    for n, block in [(1000, 192), (500, 1000)]:
        assert triton_blocks.decode_grid(n, block)[3] > 1  # really several chunks per block
        scales, packed = _sign_payloads(n, block, 2, gathered=True)
        out = _randn(n, 14)
        want = sign.sign_decode_add_torch(scales, packed, out.clone(), block)
        sign.sign_decode_add(scales, packed, out, block=block)
        assert torch.equal(out, want)
        norms, signs, codes = _qsgd_payloads(n, block, 4, 2, gathered=False)
        want = qsgd.qsgd_decode_add_torch(norms, signs, codes, out.clone(), 4, block)
        qsgd.qsgd_decode_add(norms, signs, codes, out, bits=4, block=block)
        torch.testing.assert_close(out, want, rtol=RTOL, atol=RTOL)
    assert calls["sign_decode_add"] == calls["qsgd_decode_add"] == 2


# ----- top-k -----------------------------------------------------------------------------
@NONFINITE
def test_add_and_select_at_least(calls):
    n = 3000
    x, r = _randn(n, 30), _randn(n, 31)
    v = torch.empty_like(x)
    triton_topk.add(x, r, v)
    assert torch.equal(v, x + r)
    for threshold in (0.0, 1.5, 2.5, 3.9, float("inf"), 100.0):
        idx, sq = triton_topk.select_at_least(v, threshold)
        assert idx.dtype == torch.int64 and sq.dim() == 0 and sq.dtype == torch.float32
        assert torch.equal(idx, torch.nonzero(v.abs() >= threshold).flatten())
        torch.testing.assert_close(sq, torch.dot(v, v), rtol=RTOL, atol=0)
    # hits crowded into one program, none in others; a NaN never passes; -0.0 and 0.0 pass 0.0
    w = torch.zeros(n, device=DEVICE)
    w[1024:1100] = 5.0
    w[2999] = -7.0
    w[5] = float("nan")
    w[6] = -0.0
    idx, sq = triton_topk.select_at_least(w, 4.0)
    assert torch.equal(idx, torch.cat([torch.arange(1024, 1100), torch.tensor([2999])]).to(DEVICE))
    assert torch.isnan(sq)
    idx, _ = triton_topk.select_at_least(w, 0.0)
    assert torch.equal(idx, torch.nonzero(w.abs() >= 0.0).flatten()) and 5 not in idx.tolist()


@pytest.mark.parametrize("n,k,with_residual", [(3000, 10, True), (20000, 40, True), (20000, 25, False)])
def test_topk_ef_matches_twin(calls, n, k, with_residual):
    x = _randn(n, 40 + k)
    residual = _randn(n, 41, 0.3) if with_residual else None
    res_twin = torch.empty_like(x)
    want = topk.topk_ef_torch(x, residual, k, res_twin)
    res_out = residual if with_residual else torch.empty_like(x)  # in place, when there is one
    got = topk.topk_ef(x, residual, k=k, residual_out=res_out, seed=5)
    assert calls["add"] == (1 if with_residual else 0)
    assert calls["select_at_least"] == (1 if n == 20000 else 0)  # the sampled-threshold path
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values, want.values)
    assert torch.equal(res_out, res_twin)
    torch.testing.assert_close(got.sq, want.sq, rtol=RTOL, atol=0)


def test_scatter_add_matches_index_add(calls):
    n = 3000
    out = _randn(n, 50)
    want = out.clone()
    gen = torch.Generator().manual_seed(51)
    values, indices = [], []
    for r, (m, dtype) in enumerate([(100, torch.int32), (1500, torch.int64), (0, torch.int32), (2000, torch.int32)]):
        indices.append(torch.randperm(n, generator=gen)[:m].to(dtype).to(DEVICE))  # overlapping across payloads
        values.append(_randn(m, 52 + r))
    for val, idx in zip(values, indices):
        want.index_add_(0, idx.to(torch.int64), val)
    got = topk.scatter_add(values, indices, out)
    assert calls["scatter_add"] == 1
    assert got is out
    assert torch.equal(out, want)  # the same adds in the same order
