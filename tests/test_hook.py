"""The DDP hook on 2 gloo ranks: every allowed pairing trains, ranks agree, memory behaves."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import COMPRESSORS, FEEDBACKS, CompressionConfig, register_compression
from lightning_compress.compressors.base import WIRE_ALIGN
from lightning_compress.hook import get_compression_state
from tests._dist import gather_flat, run_distributed

# Small blocks and min_numel so that the small test model is compressed.
BASE = dict(density=0.25, bits=4, block_size=32, min_numel=64)


def allowed_pairs() -> list[tuple[str, str]]:
    pairs = []
    for compressor, feedback in itertools.product(COMPRESSORS, FEEDBACKS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                CompressionConfig(compressor=compressor, feedback=feedback, **BASE)
        except ValueError:
            continue
        pairs.append((compressor, feedback))
    return pairs


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4)
    )


def make_data(rank: int, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(1000 + rank))
    return x, torch.tanh(x @ teacher)


def wrap(model: nn.Module) -> DDP:
    # 48*48 fp32 weights are 9 KB: a 4 KB cap puts each weight in its own bucket.
    return DDP(model, bucket_cap_mb=0.004)


def train(ddp: DDP, x, y, steps: int, lr: float = 0.1, momentum: float = 0.0) -> list[float]:
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_on_all_ranks(tensors, what: str) -> None:
    flats = gather_flat(tensors)
    for other in flats[1:]:
        assert torch.equal(flats[0], other), f"{what} differ across ranks"


# ---------------------------------------------------------------------------------------------
def _all_pairs_worker(rank, world, pairs):
    x, y = make_data(rank)
    for compressor, feedback in pairs:
        ddp = wrap(make_model())
        state = register_compression(ddp, CompressionConfig(compressor=compressor, feedback=feedback, **BASE))
        losses = train(ddp, x, y, steps=40, lr=0.3)
        tag = f"{compressor}+{feedback}"
        assert state.step == 40 and state.stats.steps == 40, tag
        assert state.stats.buckets_last_step >= 3, f"{tag}: only {state.stats.buckets_last_step} buckets"
        assert state.stats.compressed_last_step, tag
        assert_same_on_all_ranks(list(ddp.parameters()), f"{tag}: parameters")
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.5 * first, f"{tag}: loss went {first:.4f} -> {last:.4f}"


def test_every_allowed_pair_trains_and_ranks_agree():
    pairs = allowed_pairs()
    assert len(pairs) >= 35
    run_distributed(_all_pairs_worker, pairs)


# ---------------------------------------------------------------------------------------------
def _none_is_dense_worker(rank, world):
    x, y = make_data(rank)
    ref = wrap(make_model())
    train(ref, x, y, steps=8, momentum=0.9)
    for feedback in ("none", "ef"):
        ddp = wrap(make_model())
        register_compression(ddp, CompressionConfig(compressor="none", feedback=feedback, min_numel=1))
        train(ddp, x, y, steps=8, momentum=0.9)
        for p, q in zip(ref.parameters(), ddp.parameters()):
            assert torch.equal(p, q), f"compressor=none feedback={feedback} differs from dense DDP"


def test_compressor_none_reproduces_dense_ddp_bitwise():
    run_distributed(_none_is_dense_worker)


# ---------------------------------------------------------------------------------------------
def _wire_bytes_worker(rank, world):
    x, y = make_data(rank)
    model = make_model()
    ddp = wrap(model)
    cfg = CompressionConfig(compressor="sign", feedback="ef", block_size=32, min_numel=64)
    state = register_compression(ddp, cfg)
    train(ddp, x, y, steps=3)
    comp = cfg.make_compressor()
    compressed = [p for p in model.parameters() if p.dim() > 1 and p.numel() >= 64]
    dense = [p for p in model.parameters() if not (p.dim() > 1 and p.numel() >= 64)]
    payload = sum(comp.payload_nbytes(p.numel()) for p in compressed)
    # allgather of the payloads, each padded to WIRE_ALIGN bytes, plus WIRE_ALIGN bytes for the
    # flag per bucket (each bucket here holds one weight), and a dense allreduce of the 1-D rest
    assert state.stats.buckets_last_step >= 3
    padded = sum(-(-comp.payload_nbytes(p.numel()) // WIRE_ALIGN) * WIRE_ALIGN for p in compressed)
    assert padded - payload < WIRE_ALIGN * len(compressed)
    expected = padded + WIRE_ALIGN * state.stats.buckets_last_step + 4 * sum(p.numel() for p in dense)
    assert state.stats.bytes_last_step == expected
    assert state.stats.dense_bytes_last_step == 4 * sum(p.numel() for p in model.parameters())
    # sign: about 1 + 32/block bits per compressed element
    bits = 8 * payload / sum(p.numel() for p in compressed)
    assert abs(bits - comp.nominal_bits_per_element()) < 0.05


def test_bytes_handed_to_collectives_match_the_payload_format():
    run_distributed(_wire_bytes_worker)


# ---------------------------------------------------------------------------------------------
def _nan_worker(rank, world):
    x, y = make_data(rank)
    model = make_model()
    ddp = wrap(model)
    state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef", **BASE))
    train(ddp, x, y, steps=3)
    before = {n: m["residual"].clone() for n, m in state.memory.items()}
    ddp.zero_grad()
    out = ddp(x)
    loss = nn.functional.mse_loss(out, y)
    if rank == 1:
        loss = loss * float("inf")  # only one rank overflows
    loss.backward()
    for p in model.parameters():
        assert not torch.isfinite(p.grad).all(), "the overflow must reach every rank's gradients"
    for name, residual in before.items():
        assert torch.equal(state.memory[name]["residual"], residual), "memory changed on an overflow step"
    # training goes on afterwards, identically on both ranks
    with torch.no_grad():
        for p in model.parameters():
            p.grad = None
    train(ddp, x, y, steps=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_on_all_ranks(list(model.parameters()), "parameters after an overflow step")


def test_inf_on_one_rank_goes_dense_on_all_and_keeps_memory():
    run_distributed(_nan_worker)


# ---------------------------------------------------------------------------------------------
def _warmup_and_accumulation_worker(rank, world):
    x, y = make_data(rank)
    model = make_model()
    ddp = wrap(model)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", warmup_steps=2, **BASE))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(4):
        opt.zero_grad()
        for micro in range(3):  # gradient accumulation: only the last backward syncs
            chunk = slice(micro * 32, (micro + 1) * 32)
            if micro < 2:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x[chunk]), y[chunk]).backward()
            else:
                nn.functional.mse_loss(ddp(x[chunk]), y[chunk]).backward()
        opt.step()
        assert state.step == step + 1, "one compression per optimizer step"
        if step < 2:
            assert not state.stats.compressed_last_step and not state.memory, "warm-up is dense and keeps no memory"
            assert state.stats.bytes_last_step == state.stats.dense_bytes_last_step
        else:
            assert state.stats.compressed_last_step and state.memory
            assert state.stats.bytes_last_step < state.stats.dense_bytes_last_step / 5
    assert_same_on_all_ranks(list(model.parameters()), "parameters")


def test_warmup_is_dense_and_accumulation_compresses_once_per_step():
    run_distributed(_warmup_and_accumulation_worker)


# ---------------------------------------------------------------------------------------------
def _update_worker(rank, world):
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef", **BASE))
    train(ddp, x, y, steps=2)
    before = state.stats.bytes_last_step
    state.request_update(density=0.05)
    assert state.config.density == 0.25, "a change waits for the step boundary"
    train(ddp, x, y, steps=1)
    assert state.config.density == 0.05
    train(ddp, x, y, steps=1)
    assert state.stats.bytes_last_step < before
    with pytest.raises(ValueError, match="density"):
        state.request_update(density=2.0)
    with pytest.raises(ValueError, match="request_update"):
        state.request_update(feedback="ef21")


def test_request_update_applies_at_the_next_step_on_every_rank():
    run_distributed(_update_worker)


# ---------------------------------------------------------------------------------------------
def _resume_worker(rank, world, compressor, feedback, extra=None):
    x, y = make_data(rank)
    cfg = CompressionConfig(compressor=compressor, feedback=feedback, **{**BASE, **(extra or {})})

    # uninterrupted: 6 steps
    ddp = wrap(make_model())
    register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    snapshot = None
    for step in range(6):
        if step == 3:
            buf = io.BytesIO()
            torch.save(
                {
                    "model": ddp.module.state_dict(),
                    "opt": opt.state_dict(),
                    "compression": get_compression_state(ddp).state_dict(),
                },
                buf,
            )
            snapshot = buf.getvalue()
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    final = [p.detach().clone() for p in ddp.parameters()]

    # resumed: a new model and a new DDP wrap (new buckets), each rank loading its own state
    saved = torch.load(io.BytesIO(snapshot), weights_only=True)
    model = make_model(seed=99)
    model.load_state_dict(saved["model"])
    ddp2 = wrap(model)
    state2 = register_compression(ddp2, cfg)
    state2.load_state_dict(saved["compression"])
    assert state2.step == 3
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    for _ in range(3):
        opt2.zero_grad()
        nn.functional.mse_loss(ddp2(x), y).backward()
        opt2.step()
    for a, b in zip(final, ddp2.parameters()):
        assert torch.equal(a, b), f"{compressor}+{feedback}: resumed run differs from the uninterrupted one"


@pytest.mark.parametrize(
    "compressor,feedback,extra",
    [
        ("sign", "doublesqueeze", None),
        ("topk", "ef21", None),
        ("randk", "diana", None),
        ("qsgd", "ef", None),
        # saved at step 3, inside the density warm-up (0.25 at steps 1-2, 0.0625 at 3-4, then 0.02)
        ("topk", "ef", dict(density=0.02, warmup_steps=1, density_warmup_steps=4)),
    ],
    ids=["sign-doublesqueeze", "topk-ef21", "randk-diana", "qsgd-ef", "topk-ef-density-warmup"],
)
def test_state_dict_resume_is_bitwise_exact(compressor, feedback, extra):
    run_distributed(_resume_worker, compressor, feedback, extra)


# ---------------------------------------------------------------------------------------------
def _density_warmup_worker(rank, world):
    """DGC's density warm-up: each step's top-k keeps what CompressionConfig.density_at says, bytes fall stage
    by stage, and the ranks stay bitwise identical."""
    x, y = make_data(rank)
    ddp = wrap(make_model())
    cfg = CompressionConfig(compressor="topk", feedback="ef", **{**BASE, "density": 0.02},
                            warmup_steps=1, density_warmup_steps=4)  # fmt: skip
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    densities, sent = [], []
    for _ in range(7):
        densities.append(state.compressor.density)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        sent.append(state.stats.sent_bytes_last_step)
    assert densities == [0.02, 0.25, 0.25, 0.0625, 0.0625, 0.02, 0.02], densities  # step 0 is dense
    assert state.config.density == 0.02  # the config (saved, checked across ranks) keeps the user's value
    assert sent[0] > sent[1] == sent[2] > sent[3] == sent[4] > sent[5] == sent[6], sent
    gathered = gather_flat(ddp.parameters())
    assert all(torch.equal(gathered[0], g) for g in gathered)


def test_density_warmup_follows_the_schedule_on_every_rank():
    run_distributed(_density_warmup_worker)


# ---------------------------------------------------------------------------------------------
def _world_mismatch_worker(rank, world):
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
    x, y = make_data(rank)
    train(ddp, x, y, steps=2)
    saved = state.state_dict()
    saved["world_size"] = 4
    with pytest.warns(UserWarning, match="world size 4 -> 2"):
        state.load_state_dict(saved)
    assert state.memory == {} and state.step == 2
    with pytest.raises(RuntimeError, match="already registered"):
        register_compression(ddp, CompressionConfig())


def test_checkpoint_from_another_world_size_warns_and_starts_fresh():
    run_distributed(_world_mismatch_worker)


def test_register_rejects_non_ddp_models():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_compression(nn.Linear(2, 2), CompressionConfig())
