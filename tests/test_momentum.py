"""The optimizer's momentum moved into the exchange (lightning_compress.momentum)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, attach_optimizer, register_compression
from lightning_compress.momentum import resolve_mode
from tests._dist import gather_flat, run_distributed

BASE = dict(block_size=32, min_numel=64)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4))


def make_data(rank: int):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 + rank))
    return x, torch.tanh(x[:, :4])


def step(ddp, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----- what the moved momentum computes ----------------------------------------------------------------
def _uncompressed_worker(rank, world, ours_kwargs, mode, ref_kwargs, warmup_steps=0):
    """With nothing compressed, the moved momentum is the optimizer's own update (up to rounding); in
    warm-up steps (a dense average of the whole bucket) too."""
    x, y = make_data(rank)
    ref = make_model()
    ref_ddp = DDP(ref, bucket_cap_mb=0.004)
    ref_opt = torch.optim.SGD(ref_ddp.parameters(), lr=0.05, **ref_kwargs)
    ours = make_model()
    ddp = DDP(ours, bucket_cap_mb=0.004)
    cfg = CompressionConfig(compressor="none", feedback="none", momentum=mode, warmup_steps=warmup_steps, **BASE)
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, **ours_kwargs)
    attached = attach_optimizer(state, opt)
    assert attached is not None and state.momentum is attached
    groups_before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    for _ in range(6):
        step(ref_ddp, ref_opt, x, y)
        step(ddp, opt, x, y)
    torch.testing.assert_close(flat(ours), flat(ref), rtol=1e-5, atol=1e-6)
    # the optimizer keeps the user's settings outside step() and keeps no momentum of its own
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == groups_before
    assert all("momentum_buffer" not in s or s["momentum_buffer"] is None for s in opt.state.values())
    assert len(state.velocity) == len(list(ours.parameters())), "every parameter carries a velocity"
    both = gather_flat(ours.parameters())
    assert torch.equal(both[0], both[1])


CASES = {
    "sgd-heavy-ball": (dict(momentum=0.9, weight_decay=1e-3), "heavy_ball", dict(momentum=0.9, weight_decay=1e-3)),
    "sgd-lookahead-is-nesterov": (dict(momentum=0.9), "lookahead", dict(momentum=0.9, nesterov=True)),
    "sgd-nesterov-kept": (dict(momentum=0.9, nesterov=True), "heavy_ball", dict(momentum=0.9, nesterov=True)),
    "sgd-dampening": (dict(momentum=0.8, dampening=0.3), "heavy_ball", dict(momentum=0.8, dampening=0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moved_momentum_without_compression_is_the_optimizers(case):
    ours, mode, ref = CASES[case]
    run_distributed(_uncompressed_worker, ours, mode, ref)


@pytest.mark.parametrize("case", ["sgd-heavy-ball", "sgd-lookahead-is-nesterov"])
def test_moved_momentum_in_warmup_steps_is_the_optimizers(case):
    """Warm-up steps average the bucket densely; the moved momentum must read the gradient once divided."""
    ours, mode, ref = CASES[case]
    run_distributed(_uncompressed_worker, ours, mode, ref, 3)


def _adam_worker(rank, world):
    """Adam's first moment in the exchange (heavy_ball, nothing compressed): the optimizer steps with
    betas (0, b2) on the bias-corrected exchanged moment; its second moment follows that moment."""
    x, y = make_data(rank)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="none", feedback="none", momentum="heavy_ball", **BASE))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    attach_optimizer(state, opt)
    # The same update by hand, from the averaged gradients of an identical replica.
    ref = make_model()
    m = [torch.zeros_like(p) for p in ref.parameters()]
    v = [torch.zeros_like(p) for p in ref.parameters()]
    for t in range(1, 5):
        step(ddp, opt, x, y)
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, mi, vi in zip(ref.parameters(), m, v):
                g = p.grad.clone()
                torch.distributed.all_reduce(g)
                g /= world
                mi.mul_(0.9).add_(g, alpha=0.1)
                gh = mi / (1 - 0.9**t)
                vi.mul_(0.99).add_(gh * gh, alpha=0.01)
                p.mul_(1 - 1e-2 * 0.01)
                p.sub_(1e-2 * gh / ((vi / (1 - 0.99**t)).sqrt() + 1e-8))
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-4, atol=1e-6)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.01
    assert state.momentum.steps_taken == 4


def test_adam_first_moment_in_the_exchange():
    run_distributed(_adam_worker)


# ----- compressed: memory rules ------------------------------------------------------------------------
def _skipped_steps_worker(rank, world):
    """A step whose gradients are not finite commits no velocity (as a skipped optimizer step keeps
    torch's momentum buffer); training goes on finite and identical on both ranks."""
    x, y = make_data(rank)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    assert attach_optimizer(state, opt).mode == "lookahead"  # auto: SGD with momentum
    for _ in range(3):
        step(ddp, opt, x, y)
    before = {n: v.clone() for n, v in state.velocity.items()}
    opt.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), y)
    (loss * (float("inf") if rank == 0 else 1.0)).backward()  # a GradScaler would skip this step
    for n, v in state.velocity.items():
        assert torch.equal(v, before[n]), f"velocity of {n} changed on a non-finite step"
    opt.zero_grad()
    for _ in range(2):
        step(ddp, opt, x, y)
    both = gather_flat(model.parameters())
    assert torch.isfinite(both[0]).all() and torch.equal(both[0], both[1])
    assert any(not torch.equal(v, before[n]) for n, v in state.velocity.items())


def test_non_finite_steps_leave_velocity_untouched():
    run_distributed(_skipped_steps_worker)


def _resume_worker(rank, world, options):
    """Velocities and the step count travel in the state dict: a resumed run continues bit for bit."""
    x, y = make_data(rank)
    cfg = CompressionConfig(**options, warmup_steps=2, **BASE)

    def fresh():
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.004)
        state = register_compression(ddp, cfg)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        attach_optimizer(state, opt)
        return model, ddp, state, opt

    model, ddp, state, opt = fresh()
    for _ in range(8):
        step(ddp, opt, x, y)
    full = flat(model)
    if options["feedback"] == "ef21":  # SGD's momentum is in the exchange: 1.2 where the estimate lags (else 1)
        assert state.feedback.step == (1.2 if options["density"] <= 0.05 else 1.0), state.feedback.step
    model, ddp, state, opt = fresh()
    for _ in range(4):
        step(ddp, opt, x, y)
    saved = (state.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    model, ddp, state, opt = fresh()
    model.load_state_dict(saved[1])
    opt.load_state_dict(saved[2])
    state.load_state_dict(saved[0])
    for _ in range(4):
        step(ddp, opt, x, y)
    assert torch.equal(flat(model), full), "resume from a checkpoint is not exact with the moved momentum"


@pytest.mark.parametrize(
    "options",
    [
        dict(compressor="topk", density=0.1, feedback="ef"),
        dict(compressor="topk", density=0.1, feedback="ef21"),
        dict(compressor="topk", density=0.02, feedback="ef21"),  # EF21's step 1.2 with SGD's momentum
        dict(compressor="sign", feedback="doublesqueeze"),
        dict(compressor="randk", density=0.25, feedback="diana"),
    ],
    ids=lambda o: f"{o['compressor']}{o.get('density', '')}+{o['feedback']}",
)
def test_resume_with_moved_momentum_is_exact(options):
    run_distributed(_resume_worker, options)


# ----- choosing the mode -------------------------------------------------------------------------------
def test_auto_moves_sgd_momentum_and_adam_first_moment():
    p = [nn.Parameter(torch.zeros(2))]
    assert resolve_mode("auto", torch.optim.SGD(p, lr=0.1, momentum=0.9)) == "lookahead"
    assert resolve_mode("auto", torch.optim.SGD(p, lr=0.1)) == "optimizer"
    assert resolve_mode("auto", torch.optim.AdamW(p)) == "lookahead"
    assert resolve_mode("auto", torch.optim.Adam(p)) == "lookahead"
    assert resolve_mode("auto", torch.optim.RMSprop(p)) == "optimizer"
    assert resolve_mode("auto", torch.optim.SGD(p, lr=0.1, momentum=0.9, maximize=True)) == "optimizer"
    assert resolve_mode("optimizer", torch.optim.AdamW(p)) == "optimizer"
    with pytest.raises(ValueError, match="RMSprop"):
        resolve_mode("heavy_ball", torch.optim.RMSprop(p))
    with pytest.raises(ValueError, match="maximize"):
        resolve_mode("lookahead", torch.optim.SGD(p, lr=0.1, momentum=0.9, maximize=True))
    with pytest.raises(ValueError, match="`momentum` must be one of"):
        CompressionConfig(momentum="nesterov")


def _closure_worker(rank, world):
    """A backward pass inside ``step(closure)`` (as Lightning runs it) reads the user's settings, not the
    zeroed ones the step pre-hook leaves in the optimizer while it runs."""
    x, y = make_data(rank)
    results = []
    for use_closure in (False, True):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.004)
        state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        attach_optimizer(state, opt)
        for _ in range(4):
            if use_closure:

                def closure(opt=opt, ddp=ddp):
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(ddp(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                step(ddp, opt, x, y)
        results.append(flat(model))
        assert opt.param_groups[0]["momentum"] == 0.9
    assert torch.equal(results[0], results[1])


def test_backward_inside_step_closure_sees_the_users_momentum():
    run_distributed(_closure_worker)


def _fused_worker(rank, world):
    """Sign and top-k form the velocity inside their own pass: the same bits as forming it first."""
    from lightning_compress.compressors import COMPRESSORS

    x, y = make_data(rank)
    for options in (dict(compressor="sign", feedback="ef"), dict(compressor="topk", density=0.1, feedback="ef"),
                    dict(compressor="sign", feedback="doublesqueeze")):  # fmt: skip
        results = []
        cls = COMPRESSORS[options["compressor"]]
        for fused in (True, False):
            cls.fused_velocity = fused
            try:
                model = make_model()
                ddp = DDP(model, bucket_cap_mb=0.004)
                state = register_compression(ddp, CompressionConfig(**options, **BASE))
                opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
                attach_optimizer(state, opt)
                for _ in range(4):
                    step(ddp, opt, x, y)
            finally:
                cls.fused_velocity = True
            results.append((flat(model), {n: v.clone() for n, v in state.velocity.items()}))
        assert torch.equal(results[0][0], results[1][0]), options
        assert results[0][1].keys() == results[1][1].keys()
        assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1]), options


def test_velocity_fused_into_the_compressor_gives_the_same_bits():
    run_distributed(_fused_worker)
