"""GraVAC inside the DDP hook, on 2 gloo ranks: identical decisions, dense fallback, resume.

The controller's logic on synthetic gain streams is in test_gravac.py.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from lightning_compress import CompressionConfig, attach_gravac, register_compression
from tests._dist import run_distributed
from tests.test_hook import assert_same_on_all_ranks, make_data, make_model, wrap

BASE = dict(block_size=32, min_numel=64, feedback="ef")
# A quick schedule: theta_min 2, candidate doubling every 4 steps, up to 64.
FAST = dict(theta_min=2.0, theta_max=64.0, epsilon=0.3, window=4, scaling="geometric")


def _step(ddp, opt, x, y) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _record(run) -> list[float]:
    plan, last = run.controller.plan(), run.last
    return [plan.send_cf or 1.0, plan.min_cf, plan.candidate_cf, last["cf"], last["gain_min"],
            last["gain_candidate"], last["iteration_time"]]  # fmt: skip


def _decisions_worker(rank, world, compressor):
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor=compressor, **BASE))
    # omega 0: settling needs two CFs' measured step times within omega of each other; on this tiny model
    # they often are by chance, which stopped the candidate at its first doubling now and then. The
    # combined step times are still measured and compared across ranks below.
    run = attach_gravac(state, **dict(FAST, omega=0.0))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    rows, losses = [], []
    for _ in range(40):
        losses.append(_step(ddp, opt, x, y))
        rows.append(_record(run))
        # this rank's gain of what it sent: 1 after a dense step, else in [0, 1) (top-k keeps a part of g)
        assert (state.stats.gain == 1.0) if run.last["cf"] == 1.0 else (0.0 <= state.stats.gain < 1.0)
    table = torch.tensor(rows, dtype=torch.float64)
    # Every decision and every combined number (gains, slowest iteration time) is the same on both ranks.
    assert_same_on_all_ranks([table], "GraVAC plans and observations")
    assert_same_on_all_ranks(list(ddp.parameters()), "parameters")
    sent = table[:, 3]
    assert float(sent.max()) > FAST["theta_min"], "never went past theta_min"  # the candidate was sent
    assert float(table[:, 2].max()) > 2 * FAST["theta_min"], "the candidate CF never scaled"
    assert losses[-1] < 0.5 * losses[0]
    assert run.controller.steps == 40


@pytest.mark.parametrize("compressor", ["topk", "dgc"])
def test_decisions_identical_on_every_rank(compressor):
    run_distributed(_decisions_worker, compressor)


def _dense_worker(rank, world):
    # epsilon 1: no lossy compression reaches it, so after the first step every step is dense.
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor="topk", **BASE))
    run = attach_gravac(state, theta_min=4.0, epsilon=1.0, window=100)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _step(ddp, opt, x, y)
    assert run.last["cf"] == 4.0  # first step: theta_min, before any gain is known
    assert any(float(m["residual"].abs().sum()) > 0 for m in state.memory.values())
    _step(ddp, opt, x, y)
    assert run.last["cf"] == 1.0 and run.controller.plan().send_cf is None
    assert all(float(m["residual"].abs().sum()) == 0 for m in state.memory.values())  # cleared
    assert state.stats.ratio < 1.01  # a dense step sends what plain DDP would (plus 32 bytes of gains)
    # With an empty residual a dense step is plain averaging: compare with a reference model.
    reference = make_model()
    reference.load_state_dict(ddp.module.state_dict())
    _step(ddp, opt, x, y)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    for p, q in zip(reference.parameters(), ddp.module.parameters()):
        avg = p.grad.clone()
        dist.all_reduce(avg)
        torch.testing.assert_close(q.grad, avg / world, rtol=1e-6, atol=1e-7)


def test_low_gain_falls_back_to_dense_and_clears_the_residual():
    run_distributed(_dense_worker)


def _resume_worker(rank, world):
    x, y = make_data(rank)
    cfg = CompressionConfig(compressor="topk", **BASE)
    quiet = dict(FAST, omega=0.0)  # no promotion or settling by timing noise: the schedule depends on gains only

    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    run = attach_gravac(state, **quiet)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    rows = []
    for step in range(30):
        if step == 13:
            buf = io.BytesIO()
            torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "comp": state.state_dict()}, buf)
        _step(ddp, opt, x, y)
        rows.append(_record(run)[:6])
    final = [p.detach().clone() for p in ddp.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ddp2 = wrap(make_model(seed=5))
    ddp2.module.load_state_dict(saved["model"])
    state2 = register_compression(ddp2, cfg)
    state2.load_state_dict(saved["comp"])  # before the controller exists: kept and applied on attach
    run2 = attach_gravac(state2, **quiet)
    assert run2.controller.steps == 13
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.2, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    rows2 = []
    for _ in range(13, 30):
        _step(ddp2, opt2, x, y)
        rows2.append(_record(run2)[:6])
    assert rows2 == rows[13:]
    for a, b in zip(final, ddp2.parameters()):
        assert torch.equal(a, b.detach())


def test_resume_continues_the_schedule_bitwise():
    run_distributed(_resume_worker)


def test_rejects_what_it_cannot_adapt():
    class Fake:
        world_size, transport = 1, "allgather"

    for cfg, match in [
        (CompressionConfig(compressor="sign", feedback="ef"), "adapts the compression factor"),
        (CompressionConfig(compressor="topk", feedback="ef21"), "feedback='ef'"),
    ]:
        fake = Fake()
        fake.config, fake.compressor, fake._adaptive_saved = cfg, cfg.make_compressor(), None
        with pytest.raises(ValueError, match=match):
            attach_gravac(fake)
