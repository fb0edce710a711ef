"""Algebraic invariants of the feedback schemes, checked through the real DDP hook on 2 gloo ranks.

Units: each rank compresses ``x_i = grad_i / world``; ``sum_i x_i`` is the averaged gradient,
so the sum over ranks of a rank-local memory plays the role of the paper's ``mean_i``.

* EF: ``x_t - gamma * sum_i e_i(t)`` follows dense SGD driven by the true gradients at the
  compressed iterates: ``y_{t+1} = y_t - gamma * mean_i grad_i(x_t)``, ``y_0 = x_0``.
* DoubleSqueeze: the same with the server error added, ``x_t - gamma * (delta_t + sum_i e_i(t))``.
* EF21: ``global == sum_i local`` and every step moves the weights by ``-gamma * global``.
* DIANA: ``global_shift == sum_i shift``.
* ``compressor="none"`` reproduces plain DDP bit for bit.

Shared memory (EF21's ``global``, DIANA's ``global_shift``) must be bitwise identical on every
rank. The iterates are recomputed in float64; the comparisons allow fp32 rounding only (the
tolerances below are far smaller than the quantities they compare, which the tests check too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, register_compression
from lightning_compress.transport import shard_bounds, shard_size
from tests._dist import run_distributed

GAMMA = 0.1
STEPS = 12
# ~100 bytes: after DDP's first-step rebuild every weight of the models below gets its own bucket
# (the first step always runs with one bucket).
BUCKET_CAP_MB = 0.0001
# Odd sizes: 495, 693 and 63 elements, so two-pass shards are zero-padded and sign blocks are ragged.
BASE = dict(density=0.1, block_size=32, min_numel=32, warmup_steps=0)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(15, 33, bias=False), nn.Tanh(), nn.Linear(33, 21, bias=False), nn.Tanh(), nn.Linear(21, 3, bias=False)
    )


def make_data(rank: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + rank)  # every rank has its own data
    x = torch.randn(n, 15, generator=gen)
    y = torch.randn(n, 3, generator=gen) + rank
    return x, y


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def local_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's gradient at the current weights, computed on detached copies (DDP not involved)."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = loss_fn(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.detach() for n, g in zip(params, grads)}


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def rank_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in float64 (no rounding of its own worth speaking of)."""
    return torch.stack([g.double() for g in all_gather(t)]).sum(0)


def mean_grad(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    world = dist.get_world_size()
    return {n: rank_sum(g.reshape(-1)) / world for n, g in grads.items()}


def assert_bitwise_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    copies = all_gather(t)
    for other in copies[1:]:
        assert torch.equal(copies[0], other), f"{what} differs across ranks"


def sgd_step(ddp: DDP, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss_fn(ddp(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
def _ef_iterate_worker(rank, world, pairs):
    for compressor, feedback in pairs:
        _check_ef_iterate(rank, world, compressor, feedback)


def _check_ef_iterate(rank, world, compressor, feedback):
    x, y = make_data(rank)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    cfg = CompressionConfig(compressor=compressor, feedback=feedback, **BASE)
    state = register_compression(ddp, cfg)
    if feedback == "doublesqueeze":
        assert state.transport == "two_pass"
    opt = torch.optim.SGD(ddp.parameters(), lr=GAMMA)
    names = [n for n, _ in model.named_parameters()]
    dense = {n: p.detach().double().reshape(-1).clone() for n, p in model.named_parameters()}  # y_0 = x_0
    worst_err, largest_memory = 0.0, 0.0
    for step in range(STEPS):
        g = mean_grad(local_grads(model, x, y))  # mean_i grad_i(x_t), the true local gradients
        sgd_step(ddp, opt, x, y)
        assert state.stats.compressed_last_step
        if step > 0:  # DDP rebuilds its buckets (then capped at bucket_cap_mb) after the first step
            assert state.stats.buckets_last_step >= 3, state.stats.buckets_last_step
        for n, p in model.named_parameters():
            dense[n] -= GAMMA * g[n]
            memory = rank_sum(state.memory[n]["residual"])  # sum_i e_i(t+1)
            if feedback == "doublesqueeze":
                numel = p.numel()
                shard = state.server_memory[n]
                lo, hi = shard_bounds(numel, world, rank)
                assert shard.numel() == hi - lo and shard.dtype == torch.float32
                # Shards of different ranks may differ in length: pad to gather, then drop the padding.
                padded = torch.nn.functional.pad(shard, (0, shard_size(numel, world) - shard.numel()))
                bounds = [shard_bounds(numel, world, j) for j in range(world)]
                pieces = [s[: b - a] for s, (a, b) in zip(all_gather(padded), bounds)]
                delta = torch.cat([s.double() for s in pieces])
                assert delta.numel() == numel
                memory = memory + delta
            lhs = p.detach().double().reshape(-1) - GAMMA * memory
            err = float((lhs - dense[n]).abs().max())
            # fp32 rounding: the weights, the residuals and the sums are each exact to ~1e-7 relative.
            tol = 2e-6 * (1.0 + float(p.detach().abs().max()))
            assert err <= tol, f"{compressor}+{feedback} step {step} {n}: |x - gamma*E - y|_max = {err:.3e} > {tol:.1e}"
            worst_err = max(worst_err, err)
            largest_memory = max(largest_memory, float((GAMMA * memory).abs().max()))
    # The invariant is not vacuous: the memory term is orders of magnitude above the error.
    assert largest_memory > 1e3 * max(worst_err, 1e-9), (largest_memory, worst_err)
    assert len(names) == 3 and set(state.memory) == set(names), "all three weights are compressed"
    if rank == 0:
        print(f"\n{compressor}+{feedback}: |x - gamma*mem - y| <= {worst_err:.2e}, |gamma*mem| <= {largest_memory:.2e}")


def test_ef_and_doublesqueeze_keep_the_dense_sgd_iterate():
    # One spawn for the three runs (starting 2 processes costs several seconds here).
    run_distributed(_ef_iterate_worker, [("sign", "ef"), ("topk", "ef"), ("sign", "doublesqueeze")])


# ---------------------------------------------------------------------------------------------
def _shift_worker(rank, world, pairs):
    for compressor, feedback in pairs:
        _check_shift(rank, world, compressor, feedback)


def _check_shift(rank, world, compressor, feedback):
    x, y = make_data(rank)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    state = register_compression(ddp, CompressionConfig(compressor=compressor, feedback=feedback, **BASE))
    opt = torch.optim.SGD(ddp.parameters(), lr=GAMMA)
    local_key, global_key = ("local", "global") if feedback == "ef21" else ("shift", "global_shift")
    worst = worst_step = 0.0
    for step in range(STEPS):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        old_global = {n: m[global_key].double().clone() for n, m in state.memory.items()}
        own = local_grads(model, x, y) if step == 0 else None
        sgd_step(ddp, opt, x, y)
        if own is not None:  # g_i (h_i) start at this rank's own share of the first gradient
            for n, g in own.items():
                torch.testing.assert_close(state.memory[n][local_key], g.reshape(-1) / world, rtol=1e-6, atol=1e-8)
        # The papers' start: the first step is one dense exchange that sets g_i (h_i) to the local gradient.
        assert state.stats.compressed_last_step == (step > 0)
        for n, p in model.named_parameters():
            mem = state.memory[n]
            assert set(mem) == {local_key, global_key} and mem[global_key].dtype == torch.float32
            assert_bitwise_same_on_all_ranks(mem[global_key], f"{feedback} {global_key} of {n} at step {step}")
            total = rank_sum(mem[local_key])
            glob = mem[global_key].double()
            err = float((glob - total).abs().max())
            tol = 1e-6 * (1.0 + float(total.abs().max())) * (step + 1)
            assert err <= tol, f"{feedback} step {step} {n}: |{global_key} - sum {local_key}| = {err:.3e} > {tol:.1e}"
            assert float(total.abs().max()) > 1e-3, "the shifts moved"
            worst = max(worst, err)
            moved = (p.detach() - before[n]).double().reshape(-1)
            if feedback == "ef21" or step == 0:
                # EF21 steps along the new global estimate: x_{t+1} = x_t - gamma * g_{t+1}; at the dense
                # start both schemes step along the average, which their global memory now holds.
                direction = glob
            else:
                # DIANA steps along H_t + sum_i Q(x_i - h_i), and H_{t+1} = H_t + alpha * sum_i Q(x_i - h_i).
                prev = old_global.get(n, torch.zeros_like(glob))
                direction = prev + (glob - prev) / state.feedback.alpha(p.numel())
            step_err = float((moved + GAMMA * direction).abs().max())
            assert step_err <= 1e-5 * (1.0 + float(before[n].abs().max())), (feedback, n, step, step_err)
            worst_step = max(worst_step, step_err)
    if rank == 0:
        print(f"\n{compressor}+{feedback}: |{global_key} - sum {local_key}| <= {worst:.2e}, step err {worst_step:.2e}")


def test_ef21_global_and_diana_global_shift_are_the_sums_of_the_local_memories():
    run_distributed(_shift_worker, [("topk", "ef21"), ("randk", "diana"), ("qsgd", "diana")])


# ---------------------------------------------------------------------------------------------
def make_biased_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(15, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))


def _bitwise_worker(rank, world, feedbacks):
    for feedback in feedbacks:
        _check_bitwise(rank, world, feedback)


def _check_bitwise(rank, world, feedback):
    x, y = make_data(rank)
    ref = DDP(make_biased_model(), bucket_cap_mb=BUCKET_CAP_MB)
    opt = torch.optim.SGD(ref.parameters(), lr=GAMMA)
    for _ in range(STEPS):
        sgd_step(ref, opt, x, y)

    model = make_biased_model()
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    state = register_compression(ddp, CompressionConfig(compressor="none", feedback=feedback, min_numel=1))
    opt = torch.optim.SGD(ddp.parameters(), lr=GAMMA)
    for step in range(STEPS):
        sgd_step(ddp, opt, x, y)
        assert state.stats.compressed_last_step
        if step > 0:
            assert state.stats.buckets_last_step >= 3, state.stats.buckets_last_step
    assert len(state.memory) == 3, "every weight is compressed, biases go dense"
    for n, (p, q) in zip([n for n, _ in model.named_parameters()], zip(ref.parameters(), ddp.parameters())):
        assert torch.equal(p, q), f"compressor=none feedback={feedback}: {n} differs from plain DDP"
    for mem in state.memory.values():
        for key, t in mem.items():
            if key == "residual":
                assert not t.any(), "an exact compressor leaves no residual"


def test_compressor_none_is_plain_ddp_bit_for_bit():
    # EF is the case asked for; no feedback and DoubleSqueeze (two-pass, sharded server) must be exact too.
    run_distributed(_bitwise_worker, ["ef", "none", "doublesqueeze"])
