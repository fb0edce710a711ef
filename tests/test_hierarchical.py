"""The hierarchical exchange (dense inside a node, compressed across nodes) on 4 gloo ranks as 2 nodes of 2."""

from __future__ import annotations

import io
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, attach_gravac, register_compression
from lightning_compress.agreement import AgreementError
from lightning_compress.hierarchy import expected_sent
from lightning_compress.hook import get_compression_state
from lightning_compress.report import expected_bytes
from lightning_compress.transport import shard_bounds
from tests._dist import gather_flat, run_distributed
from tests.test_hook import BASE, make_data, make_model, train, wrap

HIER = dict(hierarchical=True, ranks_per_node=2)


def _grads_after_one_backward(cfg: CompressionConfig, x, y) -> list[torch.Tensor]:
    ddp = wrap(make_model())
    register_compression(ddp, cfg)
    nn.functional.mse_loss(ddp(x), y).backward()
    return [p.grad.detach().clone() for p in ddp.parameters()]


def _same_on_all_ranks(tensors, what: str) -> None:
    flats = gather_flat(tensors)
    assert all(torch.equal(flats[0], f) for f in flats[1:]), f"{what} differ across ranks"


# ---------------------------------------------------------------------------------------------
def _exact_identical_and_bytes_worker(rank, world):
    x, y = make_data(rank)

    # (a) Exact payloads: the hierarchical average equals the flat one up to the order of the additions
    # (((x0 + x1) + (x2 + x3)) against the ring allreduce's order, which follows the position in the buffer),
    # not bitwise: fp32 addition is not associative. fp16: the flat exchange rounds every rank's share to
    # fp16, the hierarchical one only each node's sum, so they differ by fp16 rounding (about 1e-3 relative).
    local = [p.grad for p in _local_grads(x, y)]
    exact = [torch.stack(gather_flat([g])).double().mean(0).view_as(g) for g in local]  # fp64 reference
    for compressor, rtol, atol in (("none", 1e-5, 1e-7), ("fp16", 2e-3, 1e-5)):
        base = CompressionConfig(compressor=compressor, feedback="none", min_numel=64)
        flat = _grads_after_one_backward(base, x, y)
        hier = _grads_after_one_backward(base.replace(**HIER), x, y)
        _same_on_all_ranks(hier, f"{compressor}: hierarchical gradients")
        for f, h, e in zip(flat, hier, exact):
            assert torch.allclose(h, f, rtol=rtol, atol=atol), (compressor, (h - f).abs().max())
            assert torch.allclose(h.double(), e, rtol=rtol, atol=atol), (compressor, (h.double() - e).abs().max())

    # (b) Biased compressors with error feedback: ranks bitwise identical, training goes down, memory of shard size.
    for compressor in ("sign", "topk"):
        ddp = wrap(make_model())
        state = register_compression(ddp, CompressionConfig(compressor=compressor, feedback="ef", **BASE, **HIER))
        assert state.transport == "hierarchical" and state.hierarchy is not None
        assert (state.hierarchy.node, state.hierarchy.local) == (rank // 2, rank % 2)
        losses = train(ddp, x, y, steps=12, lr=0.3)
        assert state.stats.compressed_last_step and state.stats.fallback_buckets_last_step == 0
        _same_on_all_ranks(list(ddp.parameters()), f"{compressor}+ef: parameters")
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.8 * first, f"{compressor}+ef: loss went {first:.4f} -> {last:.4f}"
        for name, p in ddp.module.named_parameters():
            if p.dim() > 1:
                lo, hi = shard_bounds(p.numel(), 2, rank % 2)
                assert state.memory[name]["residual"].numel() == hi - lo, name

    # (f) Bytes across nodes: one compressed shard of each tensor to the other node (all_gather over 2 nodes)
    # against the flat exchange's two compressed passes over 4 ranks (2 x 3/4 of a payload), all of which may
    # cross nodes. Weights only: the dense biases would be gathered alike in both.
    across = {}
    for setting in ({}, HIER):
        torch.manual_seed(0)
        ddp = DDP(nn.Sequential(nn.Linear(16, 128, bias=False), nn.Tanh(), nn.Linear(128, 128, bias=False), nn.Tanh(),
                                nn.Linear(128, 4, bias=False)), bucket_cap_mb=0.04)  # fmt: skip
        state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE, **setting))
        train(ddp, x, y, steps=2)
        s = state.stats
        across[bool(setting)] = s.sent_bytes_across_nodes_last_step
        if not setting:
            assert state.transport == "two_pass" and s.sent_bytes_across_nodes_last_step == s.sent_bytes_last_step
        else:
            assert s.sent_bytes_across_nodes_last_step < s.sent_bytes_last_step  # the fp32 traffic stays inside
            assert s.sent_bytes_across_nodes_total > s.sent_bytes_across_nodes_last_step > 0
            # The start line's estimate (lightning_compress.report) counts the same bytes, less the flags.
            params = [(n, p.shape, 4) for n, p in ddp.module.named_parameters()]
            rows = expected_bytes(state.config, params, world, transport="hierarchical")
            slack = 64 * s.buckets_last_step
            assert 0 <= s.sent_bytes_last_step - sum(r.sent_bytes for r in rows) <= slack
            across_estimate = sum(expected_sent(state.config, state.compressor, math.prod(r.shape), state.hierarchy.layout)[1]
                                  for r in rows)  # fmt: skip
            assert 0 <= s.sent_bytes_across_nodes_last_step - across_estimate <= slack
    assert across[True] < 0.4 * across[False], across  # about 1/3


def _local_grads(x, y) -> list[torch.Tensor]:
    model = make_model()
    nn.functional.mse_loss(model(x), y).backward()
    return list(model.parameters())


def test_hierarchical_matches_flat_keeps_ranks_identical_and_sends_fewer_bytes_across_nodes():
    run_distributed(_exact_identical_and_bytes_worker, world_size=4, timeout=240)


# ---------------------------------------------------------------------------------------------
def _resume_and_overflow_worker(rank, world):
    x, y = make_data(rank)
    # (c) Exact resume: save after 3 steps, continue to 6; a fresh model and DDP wrap (new buckets) loading
    # each rank's own state lands on the same bits. DoubleSqueeze also keeps a server error (two passes across nodes).
    for feedback in ("ef", "doublesqueeze"):
        cfg = CompressionConfig(compressor="sign", feedback=feedback, **BASE, **HIER)
        ddp = wrap(make_model())
        register_compression(ddp, cfg)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):
            if step == 3:
                buf = io.BytesIO()
                torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(),
                            "compression": get_compression_state(ddp).state_dict()}, buf)  # fmt: skip
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        final = [p.detach().clone() for p in ddp.parameters()]

        saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        assert saved["compression"]["node_layout"] == [2, 2]
        model = make_model(seed=99)
        model.load_state_dict(saved["model"])
        ddp2 = wrap(model)
        state2 = register_compression(ddp2, cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state2.load_state_dict(saved["compression"])
        ours = [str(w.message) for w in caught if "lightning_compress" in str(w.message)]
        assert not ours, ours
        assert state2.memory and (state2.server_memory or feedback == "ef")
        opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.05, momentum=0.9)
        opt2.load_state_dict(saved["opt"])
        for _ in range(3):
            opt2.zero_grad()
            nn.functional.mse_loss(ddp2(x), y).backward()
            opt2.step()
        for a, b in zip(final, ddp2.parameters()):
            assert torch.equal(a, b), f"sign+{feedback}: the resumed run differs from the uninterrupted one"

        # Memory saved for another layout (here: the flat exchange's) does not fit: it starts from zero, with a warning.
        flat_state = register_compression(wrap(make_model()), cfg.replace(hierarchical=False, ranks_per_node=0))
        with pytest.warns(UserWarning, match="node layout"):
            flat_state.load_state_dict(saved["compression"])
        assert not flat_state.memory

    # (d) inf on one rank: every rank falls back densely, memory untouched, training goes on alike.
    model = make_model()
    ddp = wrap(model)
    state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef", **BASE, **HIER))
    train(ddp, x, y, steps=3)
    before = {n: m["residual"].clone() for n, m in state.memory.items()}
    assert before
    ddp.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), y)
    if rank == 2:  # one rank of the second node overflows
        loss = loss * float("inf")
    loss.backward()
    assert state.stats.fallback_buckets_last_step >= 1
    for p in model.parameters():
        assert not torch.isfinite(p.grad).all(), "the overflow must reach every rank's gradients"
    for name, residual in before.items():
        assert torch.equal(state.memory[name]["residual"], residual), f"memory of {name} changed on an overflow step"
    with torch.no_grad():
        for p in model.parameters():
            p.grad = None
    train(ddp, x, y, steps=2)
    assert state.stats.fallback_buckets_last_step == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _same_on_all_ranks(list(model.parameters()), "parameters after an overflow step")


def test_hierarchical_resumes_exactly_and_falls_back_densely_on_overflow():
    run_distributed(_resume_and_overflow_worker, world_size=4, timeout=240)


# ---------------------------------------------------------------------------------------------
def _layout_worker(rank, world):
    x, y = make_data(rank)
    cfg = CompressionConfig(compressor="sign", feedback="ef", **BASE, hierarchical=True)  # ranks_per_node=0
    # Explicit ranks_per_node, then the same layout from torchrun's variables: the same bits.
    explicit = wrap(make_model())
    register_compression(explicit, cfg.replace(ranks_per_node=2))
    train(explicit, x, y, steps=3)
    os.environ.update(LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank % 2))
    from_env = wrap(make_model())
    state = register_compression(from_env, cfg)
    assert state.hierarchy is not None and tuple(state.hierarchy.layout) == (2, 2)
    train(from_env, x, y, steps=3)
    for a, b in zip(explicit.parameters(), from_env.parameters()):
        assert torch.equal(a, b), "LOCAL_WORLD_SIZE=2 must run as ranks_per_node=2"

    # (e) Layouts that cannot work fail at registration, on every rank, with the same message.
    with pytest.raises(ValueError, match=r"`ranks_per_node=3` \(from ranks_per_node\) does not divide the world size 4"):
        register_compression(wrap(make_model()), cfg.replace(ranks_per_node=3))
    os.environ["LOCAL_WORLD_SIZE"] = "2" if rank else "4"
    with pytest.raises(RuntimeError, match="different numbers of ranks per node.*rank 0: 4; rank 1: 2"):
        register_compression(wrap(make_model()), cfg)
    del os.environ["LOCAL_WORLD_SIZE"]
    with pytest.raises(ValueError, match="set `ranks_per_node`.*LOCAL_WORLD_SIZE"):
        register_compression(wrap(make_model()), cfg)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    os.environ["LOCAL_RANK"] = str((rank + 1) % 2)  # not numbered node by node
    with pytest.raises(ValueError, match="rank 0 has LOCAL_RANK 1"):
        register_compression(wrap(make_model()), cfg)
    del os.environ["LOCAL_WORLD_SIZE"], os.environ["LOCAL_RANK"]
    # One node: nothing crosses nodes; rank 0 says so once and the flat exchange runs.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = register_compression(wrap(make_model()), cfg.replace(ranks_per_node=4))
    assert state.hierarchy is None and state.transport == "two_pass"
    assert len([w for w in caught if "the flat exchange runs" in str(w.message)]) == (rank == 0)
    # Ranks that disagree on `hierarchical` itself stop at the settings check, every one, with its message.
    mixed = cfg.replace(ranks_per_node=2) if rank < 2 else cfg.replace(hierarchical=False)
    with pytest.raises(AgreementError, match="disagree on hierarchical"):
        register_compression(wrap(make_model()), mixed)
    # GraVAC picks a factor for the flat exchange: refused.
    state = register_compression(wrap(make_model()), cfg.replace(compressor="topk", ranks_per_node=2))
    with pytest.raises(ValueError, match="GraVAC.*hierarchical=True"):
        attach_gravac(state)


def test_hierarchical_layout_from_torchrun_and_bad_layouts_fail_at_registration():
    run_distributed(_layout_worker, world_size=4, timeout=240)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting,message",
    [
        ("compressor=topk,feedback=ef21,hierarchical=true", "`hierarchical=True` with `feedback='ef21'`"),
        ("compressor=randk,feedback=diana,hierarchical=true", "`hierarchical=True` with `feedback='diana'`"),
        ("ranks_per_node=2", "only applies to the hierarchical exchange"),
        ("hierarchical=true,ranks_per_node=-2", "`ranks_per_node` must be >= 0"),
        ("hierarchical=perhaps", "`hierarchical` must be true or false"),
    ],
)
def test_bad_hierarchical_settings_fail_at_construction(setting, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig.from_string(setting)


def test_hierarchical_parses_booleans_and_round_trips():
    for raw, value in (("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("off", False)):
        assert CompressionConfig.from_string(f"hierarchical={raw}").hierarchical is value
    cfg = CompressionConfig.from_string("hierarchical=true,ranks_per_node=8,feedback=doublesqueeze")
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="`hierarchical` must be bool"):
        CompressionConfig(hierarchical=1)
