"""Bytes per rank that do not grow with the number of ranks: the transport rule, on 4 gloo ranks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, attach_gravac, register_compression
from lightning_compress.config import TWO_PASS_FROM
from tests._dist import gather_flat, run_distributed
from tests.test_hook import BASE, _resume_worker, make_data, make_model, train, wrap


@pytest.mark.parametrize(
    "setting,n,expected",
    [
        ("compressor=sign,feedback=ef", 2, "allgather"),
        ("compressor=sign,feedback=ef", 3, "allgather"),
        ("compressor=sign,feedback=ef", 4, "two_pass"),
        ("compressor=topk,feedback=ef", 64, "two_pass"),
        ("compressor=sign,feedback=doublesqueeze", 2, "two_pass"),
        ("compressor=topk,feedback=ef21", 8, "allgather"),
        ("compressor=randk,feedback=diana", 8, "allreduce"),
        ("compressor=qsgd,feedback=none", 8, "allgather"),
        ("compressor=fp16,feedback=none", 8, "allreduce"),
        ("compressor=sign,feedback=ef,transport=allgather", 8, "allgather"),
    ],
)
def test_auto_transport_follows_the_number_of_ranks(setting, n, expected):
    assert CompressionConfig.from_string(setting).transport_for(n) == expected
    assert TWO_PASS_FROM == 4


def test_gravac_keeps_all_gather_at_any_number_of_ranks():
    assert CompressionConfig(compressor="topk").transport_for(8, adaptive=True) == "allgather"


# ---------------------------------------------------------------------------------------------
def _ef_is_doublesqueeze_worker(rank, world):
    # On 4 ranks, auto sends ef in two compressed passes: the same arithmetic as DoubleSqueeze, to the bit.
    x, y = make_data(rank)
    finals = {}
    for feedback in ("ef", "doublesqueeze"):
        ddp = wrap(make_model())
        state = register_compression(ddp, CompressionConfig(compressor="topk", feedback=feedback, **BASE))
        assert state.transport == "two_pass"
        losses = train(ddp, x, y, steps=4)
        assert losses[-1] < losses[0], losses
        assert state.server_memory, "no server error kept"
        assert state.stats.compressed_last_step
        finals[feedback] = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
        flats = gather_flat(ddp.parameters())
        assert all(torch.equal(flats[0], f) for f in flats[1:]), "ranks differ"
    assert torch.equal(finals["ef"], finals["doublesqueeze"])


def test_ef_on_four_ranks_compresses_both_passes_like_doublesqueeze():
    run_distributed(_ef_is_doublesqueeze_worker, world_size=4)


def test_ef_in_two_passes_resumes_bitwise_exactly():
    run_distributed(_resume_worker, "sign", "ef", world_size=4)


# ---------------------------------------------------------------------------------------------
def _bytes_worker(rank, world, setting, out):
    # Weights of 295k elements, biases of 1k (they stay dense); the bytes are what the collectives were handed.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 64))
    ddp = DDP(model)
    state = register_compression(ddp, setting)
    x, y = make_data(rank)
    for _ in range(2):
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x)[:, :4], y).backward()
    if rank == 0:
        s = state.stats
        Path(out).write_text(json.dumps({"transport": state.transport, "sent": s.sent_bytes_last_step}))


@pytest.mark.parametrize("setting", ["compressor=sign,feedback=ef"])
def test_bytes_per_rank_grow_at_most_twofold_from_two_to_four_ranks(tmp_path, setting):
    sent = {}
    for world in (2, 4):
        out = tmp_path / f"{world}.json"
        run_distributed(_bytes_worker, setting, str(out), world_size=world)
        sent[world] = json.loads(out.read_text())
    assert sent[2]["transport"] == "allgather" and sent[4]["transport"] == "two_pass"
    # all_gather would send n-1 payloads (3 at 4 ranks); two passes send 2(n-1)/n = 1.5, plus flags and
    # alignment, and the biases (gathered from 3 ranks on, see Collectives.sum_ordered_async).
    growth = sent[4]["sent"] / sent[2]["sent"]
    assert 1.4 < growth < 1.75, sent


# ---------------------------------------------------------------------------------------------
def _warn_and_gravac_worker(rank, world):
    x, y = make_data(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = wrap(make_model())
        state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef21", **BASE))
    assert state.transport == "allgather"
    grows = [w for w in caught if "grow with the number of ranks" in str(w.message)]
    assert len(grows) == (1 if rank == 0 else 0), [str(w.message) for w in caught]
    train(ddp, x, y, steps=1)

    # GraVAC sends at its own CF through all_gather: attaching it turns auto's two passes back into one.
    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef", **BASE))
    assert state.transport == "two_pass"
    attach_gravac(state)
    assert state.transport == "allgather"
    train(ddp, x, y, steps=2)
    flats = gather_flat(ddp.parameters())
    assert all(torch.equal(flats[0], f) for f in flats[1:]), "ranks differ"

    ddp = wrap(make_model())
    state = register_compression(ddp, CompressionConfig(compressor="topk", feedback="ef", transport="two_pass", **BASE))
    with pytest.raises(ValueError, match="not transport='two_pass'"):
        attach_gravac(state)


def test_non_scaling_pairs_warn_and_gravac_falls_back_to_all_gather():
    run_distributed(_warn_and_gravac_worker, world_size=4)


def test_rank_ordered_sum_is_an_allreduce_beyond_eight_ranks():
    # Bytes per rank of the small dense tensors stay flat on many ranks (the all_gather would send N-1 copies).
    from lightning_compress.collectives import ORDERED_SUM_UP_TO, Collectives, done_future

    for n, kind in ((4, "all_gather"), (ORDERED_SUM_UP_TO, "all_gather"), (ORDERED_SUM_UP_TO + 1, "allreduce")):
        comm, calls = Collectives(None, n, 0), []

        def allreduce(t, calls=calls):
            calls.append("allreduce")
            return done_future(t)

        def all_gather(t, calls=calls, n=n):
            calls.append("all_gather")
            return torch.ones(n, t.numel()), done_future(None)

        comm.allreduce_async, comm.all_gather_async = allreduce, all_gather
        out = comm.sum_ordered_async(torch.zeros(4)).wait()
        assert calls == [kind], (n, calls)
        if kind == "all_gather":
            assert torch.equal(out, torch.full((4,), float(n)))  # every rank's row added
