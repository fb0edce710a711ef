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


def _adam_step_worker(rank, world, adam_cls, wd):
    """``adam_step``, nothing compressed: each rank runs Adam (look-ahead numerator) on its own gradient,
    the exchange averages the steps and the optimizer applies ``lr`` times the average (AdamW: after its
    decoupled decay; Adam: its L2 decay is added to the gradient before the moments)."""
    x, y = make_data(rank)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="none", feedback="none", momentum="adam_step", **BASE))
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    opt = adam_cls(ddp.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    assert attach_optimizer(state, opt).mode == "adam_step"
    decoupled = adam_cls is torch.optim.AdamW
    ref = make_model()
    m = [torch.zeros_like(p) for p in ref.parameters()]
    v = [torch.zeros_like(p) for p in ref.parameters()]
    for t in range(1, 6):
        step(ddp, opt, x, y)
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, mi, vi in zip(ref.parameters(), m, v):
                g = p.grad.clone() if decoupled else p.grad + wd * p  # this rank's own gradient
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                own = (b1 * mi + (1 - b1) * g) / (1 - b1**t) / ((vi / (1 - b2**t)).sqrt() + eps)
                torch.distributed.all_reduce(own)
                if decoupled:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * own / world)
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-4, atol=1e-6)
    group = opt.param_groups[0]
    assert group["lr"] == lr and group["betas"] == (b1, b2) and group["weight_decay"] == wd
    assert len(state.second_moment) == len(list(model.parameters())), "every parameter carries a second moment"
    assert state.momentum.steps_taken == 5
    both = gather_flat(model.parameters())
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("adam_cls,wd", [(torch.optim.AdamW, 0.01), (torch.optim.Adam, 1e-3)], ids=["adamw", "adam-l2"])
def test_adam_step_in_the_exchange(adam_cls, wd):
    run_distributed(_adam_step_worker, adam_cls, wd)


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
    cfg = CompressionConfig(**{k: v for k, v in options.items() if k != "optimizer"}, warmup_steps=2, **BASE)

    def fresh():
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.004)
        state = register_compression(ddp, cfg)
        if options.get("optimizer") == "adamw":
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=1e-2)
        else:
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        attach_optimizer(state, opt)
        return model, ddp, state, opt

    model, ddp, state, opt = fresh()
    for _ in range(8):
        step(ddp, opt, x, y)
    full = flat(model)
    if options.get("optimizer") == "adamw":  # auto runs Adam's step before DoubleSqueeze; it is saved
        assert state.momentum.mode == "adam_step" and state.second_moment
    if options["feedback"] == "ef21":  # SGD's momentum is in the exchange: 1.1 where the estimate lags (else 1)
        assert state.feedback.step == (1.1 if options["density"] <= 0.05 else 1.0), state.feedback.step
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
        dict(compressor="topk", density=0.02, feedback="ef21"),  # EF21's step 1.1 with SGD's momentum
        dict(compressor="sign", feedback="doublesqueeze"),
        dict(compressor="sign", feedback="doublesqueeze", optimizer="adamw"),
        dict(compressor="randk", density=0.25, feedback="diana"),
    ],
    ids=lambda o: f"{o['compressor']}{o.get('density', '')}+{o['feedback']}{'-' + o['optimizer'] if 'optimizer' in o else ''}",
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


def test_auto_runs_adams_step_before_doublesqueeze_on_two_ranks_only():
    p = [nn.Parameter(torch.zeros(2))]
    adamw = torch.optim.AdamW(p)
    ds = CompressionConfig(compressor="sign", feedback="doublesqueeze")
    assert resolve_mode("auto", adamw, ds, world=2) == "adam_step"
    assert resolve_mode("auto", adamw, CompressionConfig(compressor="topk", feedback="doublesqueeze"), world=2) == "adam_step"
    assert resolve_mode("auto", torch.optim.Adam(p), ds, world=2) == "adam_step"
    # on more ranks each rank's own second moment is too noisy (digits MLP, 4 ranks: 1.4 behind against 1.1)
    for world in (4, 8, None):
        assert resolve_mode("auto", adamw, ds, world=world) == "lookahead", world
    for other in ("compressor=sign,feedback=ef", "compressor=topk,density=0.01,feedback=ef",
                  "compressor=topk,density=0.01,feedback=ef21", "compressor=randk,feedback=diana"):  # fmt: skip
        assert resolve_mode("auto", adamw, CompressionConfig.from_string(other), world=2) == "lookahead", other
    assert resolve_mode("auto", adamw) == "lookahead"  # no config: nothing known about the exchange
    assert resolve_mode("auto", torch.optim.SGD(p, lr=0.1, momentum=0.9), ds, world=2) == "lookahead"
    # where the exchanged step would be wrong, auto keeps the look-ahead and an explicit request is refused
    assert resolve_mode("auto", adamw, ds, loss_scaled=True, world=2) == "lookahead"
    assert resolve_mode("auto", torch.optim.AdamW(p, amsgrad=True), ds, world=2) == "lookahead"
    assert resolve_mode("auto", adamw, ds, outside=True, world=2) == "lookahead"
    assert resolve_mode("adam_step", adamw, CompressionConfig(compressor="topk", feedback="ef21")) == "adam_step"
    assert resolve_mode("adam_step", adamw, ds, world=8) == "adam_step"  # asked for: runs on any number of ranks
    with pytest.raises(ValueError, match="loss scaler"):
        resolve_mode("adam_step", adamw, ds, loss_scaled=True)
    with pytest.raises(ValueError, match="amsgrad"):
        resolve_mode("adam_step", torch.optim.AdamW(p, amsgrad=True), ds)
    with pytest.raises(ValueError, match="outside"):
        resolve_mode("adam_step", adamw, ds, outside=True)
    with pytest.raises(ValueError, match="SGD"):
        resolve_mode("adam_step", torch.optim.SGD(p, lr=0.1, momentum=0.9))


def test_adam_step_keeps_lookahead_for_an_optimizer_with_parameters_outside_the_model():
    from lightning_compress.state import CompressionState

    model = make_model()
    named = list(model.named_parameters())
    cfg = CompressionConfig(compressor="sign", feedback="doublesqueeze", **BASE)
    state = CompressionState(cfg, {id(p): n for n, p in named}, param_shapes={n: p.shape for n, p in named})
    assert attach_optimizer(state, torch.optim.AdamW(model.parameters())).mode == "adam_step"
    state.momentum.detach()
    state.momentum = None
    extra = nn.Parameter(torch.zeros(3))
    assert attach_optimizer(state, torch.optim.AdamW([*model.parameters(), extra])).mode == "lookahead"


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


def test_saved_second_moments_are_restored_and_bad_ones_start_afresh():
    """Adam's second moments (``adam_step``) travel in the state dict; one that is negative, not finite
    or of another shape is dropped with a warning (it would start from the next gradient's square)."""
    from lightning_compress.state import CompressionState

    model = make_model()
    named = list(model.named_parameters())
    cfg = CompressionConfig(compressor="sign", feedback="doublesqueeze", **BASE)

    def fresh():
        return CompressionState(cfg, {id(p): n for n, p in named}, param_shapes={n: p.shape for n, p in named})

    state = fresh()
    state.second_moment = {n: torch.rand(p.numel()) for n, p in named}
    sd = state.state_dict()
    other = fresh()
    other.load_state_dict(sd)
    assert other.second_moment.keys() == state.second_moment.keys()
    assert all(torch.equal(other.second_moment[n], t) for n, t in state.second_moment.items())
    bad = dict(sd, second_moment={**sd["second_moment"]})
    bad["second_moment"]["0.weight"] = -bad["second_moment"]["0.weight"]
    bad["second_moment"]["2.weight"] = torch.full_like(bad["second_moment"]["2.weight"], float("nan"))
    bad["second_moment"]["4.weight"] = torch.ones(3)
    other = fresh()
    with pytest.warns(UserWarning, match="second moment of '0.weight': holds negative values") as caught:
        other.load_state_dict(bad)
    text = str(caught[0].message)
    assert "second moment of '2.weight'" in text and "second moment of '4.weight'" in text
    assert set(other.second_moment) == set(state.second_moment) - {"0.weight", "2.weight", "4.weight"}
    older = {k: v for k, v in sd.items() if k != "second_moment"}  # a checkpoint from before adam_step
    other = fresh()
    other.load_state_dict(older)
    assert other.second_moment == {}


def test_adam_step_without_a_saved_second_moment_starts_from_the_gradients_square():
    """First step: v = (1 - b2) x^2, Adam's own start. Later (a checkpoint from before ``adam_step``):
    v = (1 - b2^t) x^2, whose bias-corrected value is x^2, so the step is not blown up by a zero v."""
    from lightning_compress.momentum import ExchangeMomentum
    from lightning_compress.state import CompressionState

    p = nn.Parameter(torch.zeros(8))
    cfg = CompressionConfig(compressor="sign", feedback="doublesqueeze", **BASE)
    state = CompressionState(cfg, {id(p): "w"}, param_shapes={"w": p.shape})
    opt = torch.optim.AdamW([p], betas=(0.9, 0.99))
    moved = ExchangeMomentum(state, opt, "adam_step")
    grad = torch.linspace(-1, 1, 8)
    for taken in (0, 10):
        moved.steps_taken = taken
        prepared = moved.prepare(state, "w", p, grad, 1)
        s = prepared.s
        t = taken + 1
        torch.testing.assert_close(prepared.second, (1 - 0.99**t) * grad * grad)
        u = (1 - 0.9) * grad  # the velocity's first step (no saved velocity either)
        expected = (0.9 * u + 0.1 * grad) / (1 - 0.9**t) / (grad.abs() + 1e-8)
        torch.testing.assert_close(s, expected)


class _Scaler:
    """A loss scaler as the integrations see one (torch.amp.GradScaler's interface)."""

    def is_enabled(self):
        return True

    def get_scale(self):
        return 65536.0


def test_integrations_keep_the_lookahead_under_a_loss_scaler():
    """``adam_step`` needs unscaled gradients: Accelerate's ``enable()`` and the strategies pass whether a
    GradScaler is on, and ``auto`` then keeps the look-ahead for AdamW + DoubleSqueeze."""
    from types import SimpleNamespace

    from accelerate_compress.adapter import attach_prepared_optimizer
    from lightning_compress.state import CompressionState
    from lightning_compress.strategy import CompressedDDPStrategy

    model = make_model()
    named = list(model.named_parameters())
    cfg = CompressionConfig(compressor="sign", feedback="doublesqueeze", **BASE)
    for scaler, mode in ((_Scaler(), "lookahead"), (None, "adam_step")):
        state = CompressionState(cfg, {id(p): n for n, p in named}, param_shapes={n: p.shape for n, p in named})
        accelerator = SimpleNamespace(scaler=scaler, _optimizers=[torch.optim.AdamW(model.parameters())])
        attach_prepared_optimizer(accelerator, state)
        assert state.momentum.mode == mode
        state.momentum.detach()
        strategy = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
        assert CompressedDDPStrategy._loss_scaled(strategy) is (scaler is not None)


def _adam_step_odd_model_worker(rank, world):
    """``adam_step`` on an awkward model: bf16 weights, a frozen layer, a weight tied to two uses.
    Training stays finite, the replicas identical, the frozen layer untouched."""
    x, y = make_data(rank)
    torch.manual_seed(0)
    shared = nn.Linear(48, 48)
    model = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(48, 4))
    model[0].requires_grad_(False)
    model = model.to(torch.bfloat16)
    frozen = model[0].weight.detach().clone()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="doublesqueeze", **BASE))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert attach_optimizer(state, opt).mode == "adam_step"
    start = flat(model).clone()
    for _ in range(5):
        step(ddp, opt, x.to(torch.bfloat16), y.to(torch.bfloat16))
    both = gather_flat(model.parameters())
    assert torch.isfinite(both[0].float()).all() and torch.equal(both[0], both[1])
    assert torch.equal(model[0].weight, frozen) and not torch.equal(flat(model), start)
    assert all(t.dtype == torch.float32 for t in state.second_moment.values())
    assert "0.weight" not in state.second_moment and "2.weight" in state.second_moment


def test_adam_step_with_bf16_weights_a_frozen_layer_and_a_tied_weight():
    run_distributed(_adam_step_odd_model_worker)


@pytest.mark.parametrize("mode", ["lookahead", "heavy_ball", "adam_step"])
def test_a_moving_mode_refuses_a_model_trained_by_two_optimizers(mode):
    """Every mode that moves momentum moves one optimizer's: Accelerate and the strategies refuse two."""
    from types import SimpleNamespace

    from accelerate_compress.adapter import attach_prepared_optimizer
    from lightning_compress.state import CompressionState
    from lightning_compress.strategy import CompressedDDPStrategy

    model = make_model()
    named = list(model.named_parameters())
    cfg = CompressionConfig(compressor="sign", feedback="doublesqueeze", momentum=mode, **BASE)
    state = CompressionState(cfg, {id(p): n for n, p in named}, param_shapes={n: p.shape for n, p in named})
    two = [torch.optim.AdamW(model[0].parameters()), torch.optim.AdamW(model[2].parameters())]
    with pytest.raises(ValueError, match="trained by 2 optimizers"):
        attach_prepared_optimizer(SimpleNamespace(scaler=None, _optimizers=two), state)
    strategy = SimpleNamespace(_compression_state=state)
    with pytest.raises(ValueError, match="has 2 optimizers"):
        CompressedDDPStrategy._attach_optimizers(strategy, two)
    assert state.momentum is None
