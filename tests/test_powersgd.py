"""PowerSGD: low-rank messages that add up, exchanged by two allreduces on gloo."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, get_compression_state, register_compression
from lightning_compress.compressors.powersgd import (
    PowerSGDCompressor,
    low_rank_pays,
    matrix_shape,
    orthonormalize,
)
from lightning_compress.report import expected_bytes
from tests._dist import gather_flat, run_distributed
from tests.test_hook import make_data, make_model, train, wrap

PSGD = dict(compressor="powersgd", powersgd_rank=2, min_numel=64)
WEIGHTS = {"0.weight", "2.weight", "4.weight", "6.weight"}  # make_model's matrices


# ----- one process -------------------------------------------------------------------------
def test_matrix_view_and_sizes():
    assert matrix_shape((64, 8, 3, 3)) == (64, 72)
    assert matrix_shape(2048) == (32, 64)
    assert matrix_shape(97) == (1, 97)  # a prime fills one row
    assert low_rank_pays(48, 48, 2) and not low_rank_pays(4, 4, 2)
    comp = PowerSGDCompressor(rank=2)
    assert comp.payload_numel(2048) == (32 + 64) * 2
    assert comp.payload_numel_shaped((48, 16)) == (48 + 16) * 2
    assert comp.payload_numel_shaped((4, 4)) == 16  # factors not smaller: sent as it is


def test_flags_and_nominal_rate():
    comp = PowerSGDCompressor(rank=4)
    assert not comp.unbiased and not comp.summable and comp.omega(4096) is None
    assert comp.alpha(2**20) == pytest.approx(4 / 1024)  # a random rank-4 subspace of 1024 directions
    assert comp.alpha(16) == 1.0  # sent as it is
    n = 2**20  # viewed as 1024 x 1024
    assert 8 * comp.payload_nbytes(n) / n == pytest.approx(comp.nominal_bits_per_element())


def test_orthonormalize_is_orthonormal_even_when_rank_deficient():
    p = torch.randn(50, 3)
    p[:, 2] = 2 * p[:, 0]  # dependent column
    for m in (p, torch.zeros(50, 3)):
        q = orthonormalize(m)
        assert torch.allclose(q.t() @ q, torch.eye(3), atol=1e-5)


def test_one_rank_compression_is_a_projection_that_recovers_low_rank_matrices():
    torch.manual_seed(0)
    comp = PowerSGDCompressor(rank=2)
    low = (torch.randn(32, 2) @ torch.randn(2, 64)).reshape(-1)
    enc = comp.compress(low, seed=1)
    assert enc.err_sq <= 1e-6 * enc.norm_sq  # a rank-2 matrix is kept whole by rank 2
    full = torch.randn(32 * 64)
    enc = comp.compress(full, seed=1, residual_out=(err := torch.empty_like(full)))
    assert 0 < enc.err_sq < enc.norm_sq  # contractive
    assert torch.allclose(err, full - comp.decode(enc.payload, full.numel(), 1), atol=1e-5)


def test_config_rules():
    assert CompressionConfig(compressor="powersgd").transport_for(64) == "allreduce"
    assert CompressionConfig(compressor="powersgd", powersgd_rank=8).make_compressor().rank == 8
    assert CompressionConfig.from_string("compressor=powersgd,powersgd_rank=3").powersgd_rank == 3
    with pytest.raises(ValueError, match="powersgd_rank"):
        CompressionConfig(compressor="powersgd", powersgd_rank=0)
    for bad in ("ef21", "doublesqueeze", "diana"):
        with pytest.raises(ValueError, match="feedback"):
            CompressionConfig(compressor="powersgd", feedback=bad)
    for bad in ("allgather", "two_pass"):
        with pytest.raises(ValueError, match="two allreduces"):
            CompressionConfig(compressor="powersgd", transport=bad)
    with pytest.raises(TypeError, match="powersgd_rank"):
        CompressionConfig(compressor="powersgd", powersgd_rank=2.5)


def test_expected_bytes_follow_the_shapes():
    cfg = CompressionConfig(**PSGD)
    rows = {r.name: r for r in expected_bytes(cfg, [("w", (48, 16), 4), ("b", (48,), 4), ("s", (4, 4), 4)], 4)}
    ring = 2 * 3 / 4
    assert rows["w"].sent_bytes == pytest.approx(4 * (48 + 16) * 2 * ring)
    assert rows["b"].dense_reason == "1-D"
    assert rows["s"].sent_bytes == rows["s"].dense_bytes  # 16 elements < min_numel: dense


# ----- on gloo -----------------------------------------------------------------------------
def _train_worker(rank, world, feedback, momentum):
    x, y = make_data(rank)
    ref = wrap(make_model())
    dense = train(ref, x, y, steps=40, momentum=momentum)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(feedback=feedback, **PSGD))
    assert state.transport == "allreduce"
    losses = train(ddp, x, y, steps=40, momentum=momentum)
    assert state.stats.compressed_last_step and state.stats.fallback_buckets_last_step == 0
    flats = gather_flat(ddp.parameters())
    assert all(torch.equal(flats[0], f) for f in flats[1:]), "ranks differ"
    # warm-start factors: one per weight (48x16, 48x48, 48x48, 4x48: all smaller as rank-2 factors)
    assert set(state.factors) == WEIGHTS, sorted(state.factors)
    factors = gather_flat(state.factors[k] for k in sorted(state.factors))
    assert torch.equal(factors[0], factors[1]), "factors differ across ranks"
    assert 0.0 < state.stats.gain < 1.0
    assert losses[-1] < 0.7 * losses[0], (losses[::8], dense[::8])
    if feedback == "ef":  # with error feedback it keeps close to dense SGD on this problem
        assert losses[-1] < 1.25 * dense[-1], (losses[-1], dense[-1])
        assert all(float(m["residual"].abs().sum()) > 0 for m in state.memory.values())


@pytest.mark.parametrize("feedback,momentum", [("ef", 0.0), ("ef", 0.9), ("none", 0.0)])
def test_trains_and_ranks_stay_identical(feedback, momentum):
    run_distributed(_train_worker, feedback, momentum, timeout=240)


def _bytes_worker(rank, world):
    # One 48x48 weight per bucket: P is 48x2, Q is 48x2 (two allreduces of 96 values, plus a flag each).
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(**PSGD))
    handed = []
    for _ in range(3):
        train(ddp, x, y, steps=1)
        handed.append(state.stats.bytes_last_step)
    from lightning_compress.report import expected_bytes as eb

    names = [(n, tuple(p.shape), 4) for n, p in ddp.module.named_parameters()]
    expected = sum(r.sent_bytes for r in eb(state.config, names, world))
    # sent = handed * 2(n-1)/n for allreduces: the flag elements (4 bytes each) are the only extra
    assert state.stats.sent_bytes_last_step == pytest.approx(expected, abs=64)
    assert state.stats.ratio > 3.0, state.stats.ratio


def test_bytes_match_the_factor_sizes():
    run_distributed(_bytes_worker, timeout=120)


def _nan_worker(rank, world):
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(**PSGD))
    train(ddp, x, y, steps=3)
    before_mem = {k: v["residual"].clone() for k, v in state.memory.items()}
    before_q = {k: v.clone() for k, v in state.factors.items()}
    ddp.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), y)
    if rank == 1:
        loss = loss * float("inf")
    loss.backward()
    assert state.stats.fallback_buckets_last_step > 0
    assert all(not torch.isfinite(p.grad).all() for p in ddp.parameters() if p.dim() > 1)
    for k, v in before_mem.items():
        assert torch.equal(v, state.memory[k]["residual"]), f"memory of {k} changed"
    for k, v in before_q.items():
        assert torch.equal(v, state.factors[k]), f"factor of {k} changed"
    losses = train(ddp, x, y, steps=3)  # and it goes on compressing
    assert state.stats.fallback_buckets_last_step == 0 and all(math.isfinite(v) for v in losses)


def test_inf_on_one_rank_goes_dense_and_keeps_memory_and_factors():
    run_distributed(_nan_worker, timeout=120)


def _resume_worker(rank, world):
    x, y = make_data(rank)
    cfg = CompressionConfig(**PSGD)
    ddp = wrap(make_model())
    register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    snapshot = None
    for step in range(6):
        if step == 3:
            buf = io.BytesIO()
            torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(),
                        "compression": get_compression_state(ddp).state_dict()}, buf)  # fmt: skip
            snapshot = buf.getvalue()
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    final = [p.detach().clone() for p in ddp.parameters()]

    saved = torch.load(io.BytesIO(snapshot), weights_only=True)
    assert set(saved["compression"]["factors"]) == WEIGHTS
    resumed, _ = _resume(saved, cfg, x, y)
    for a, b in zip(final, resumed):
        assert torch.equal(a, b), "resumed run differs"

    # Without the factors (an older checkpoint) it goes on from fresh ones: it runs, and differs.
    saved["compression"].pop("factors")
    resumed, loaded = _resume(saved, cfg, x, y)
    assert loaded == {}
    assert not all(torch.equal(a, b) for a, b in zip(final, resumed))


def _resume(saved, cfg, x, y, steps: int = 3):
    """A new model and DDP wrap loading ``saved``, trained ``steps`` more: its parameters, and the
    factors the compression state held right after the load."""
    model = make_model(seed=99)
    model.load_state_dict(saved["model"])
    ddp = wrap(model)
    state = register_compression(ddp, cfg)
    state.load_state_dict(saved["compression"])
    loaded = dict(state.factors)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach() for p in ddp.parameters()], loaded


def test_resume_is_bitwise_exact_with_the_factors():
    run_distributed(_resume_worker, timeout=180)


def _factor_mismatch_worker(rank, world):
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(**PSGD))
    train(ddp, x, y, steps=2)
    saved = state.state_dict()
    ddp2 = wrap(make_model())
    state2 = register_compression(ddp2, CompressionConfig(**{**PSGD, "powersgd_rank": 3}))
    with pytest.warns(UserWarning, match="PowerSGD factor"):
        state2.load_state_dict(saved)
    assert state2.factors == {}
    train(ddp2, x, y, steps=2)
    assert all(q.shape[1] == 3 for q in state2.factors.values())


def test_factors_of_another_rank_setting_start_afresh():
    run_distributed(_factor_mismatch_worker, timeout=120)


def _conv_worker(rank, world):
    # Conv weights are viewed as out x (in * kh * kw); tied weights appear once.
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32), lin, nn.Tanh(), lin)
    ddp = DDP(model)
    state = register_compression(ddp, CompressionConfig(compressor="powersgd", powersgd_rank=1, min_numel=64))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    assert tuple(state.factors["0.weight"].shape) == (27, 1)
    assert tuple(state.factors["3.weight"].shape) == (576, 1)
    flats = gather_flat(ddp.parameters())
    assert torch.equal(flats[0], flats[1])


def test_conv_and_tied_weights():
    run_distributed(_conv_worker, timeout=120)


def _bf16_worker(rank, world):
    # bf16 parameters: the gradient is widened to fp32 for the factors, memory and factors stay fp32.
    x, y = make_data(rank)
    ddp = wrap(make_model().to(torch.bfloat16))
    state = register_compression(ddp, CompressionConfig(**PSGD))
    losses = train(ddp, x.bfloat16(), y.bfloat16(), steps=6)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert state.stats.compressed_last_step and state.stats.fallback_buckets_last_step == 0
    assert set(state.factors) == WEIGHTS and all(q.dtype == torch.float32 for q in state.factors.values())
    assert all(m["residual"].dtype == torch.float32 for m in state.memory.values())
    flats = gather_flat(ddp.parameters())
    assert torch.equal(flats[0], flats[1])


def test_bf16_parameters():
    run_distributed(_bf16_worker, timeout=120)
