"""The overlapped exchange: buckets in flight during backward compute what the synchronous one does."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, register_compression
from lightning_compress.exchange import StepPipeline
from tests._dist import gather_flat, run_distributed

BASE = dict(block_size=32, min_numel=64)
CONFIGS = [
    dict(compressor="sign", feedback="ef"),
    dict(compressor="topk", density=0.1, feedback="ef"),
    dict(compressor="sign", feedback="doublesqueeze"),  # two-pass: the second pass is issued later
    dict(compressor="topk", density=0.1, feedback="ef21"),
    dict(compressor="randk", density=0.25, feedback="diana"),  # allreduce of summable payloads
    dict(compressor="qsgd", bits=4, feedback="ef", transport="two_pass"),
    dict(compressor="none", feedback="none", transport="allgather"),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4)
    )


def make_data(rank: int):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 + rank))
    return x, torch.tanh(x[:, :4])


def wrap(model: nn.Module) -> DDP:
    return DDP(model, bucket_cap_mb=0.004)  # each 48x48 weight in its own bucket: several buckets in flight


class DrainSizes:
    """Records how many buckets were in flight whenever a step (or bucket) was drained."""

    def __init__(self):
        self.sizes: list[int] = []
        self._original = StepPipeline.drain
        recorder = self

        def drain(pipeline, state):
            recorder.sizes.append(len(pipeline.flights))
            return recorder._original(pipeline, state)

        StepPipeline.drain = drain

    def restore(self):
        StepPipeline.drain = self._original


def train(ddp, state_overlap: bool, cfg: dict, x, y, steps: int = 5):
    state = register_compression(ddp, CompressionConfig(**cfg, **BASE))
    state.overlap = state_overlap
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return state


def _equivalence_worker(rank, world):
    x, y = make_data(rank)
    for cfg in CONFIGS:
        sizes = DrainSizes()
        try:
            a, b = make_model(), make_model()
            sa = train(wrap(a), True, cfg, x, y)
            overlapped = list(sizes.sizes)
            sizes.sizes.clear()
            sb = train(wrap(b), False, cfg, x, y)
            synchronous = list(sizes.sizes)
        finally:
            sizes.restore()
        # Overlapped: the last bucket finds every bucket of the step still to be drained;
        # synchronous: each bucket is drained on its own.
        assert max(overlapped) >= 3, (cfg, overlapped)
        assert max(synchronous) == 1, (cfg, synchronous)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"{cfg}: {name} differs between the overlapped and the synchronous exchange"
        assert sa.memory.keys() == sb.memory.keys() and sa.memory, cfg
        for name in sa.memory:
            for key in sa.memory[name]:
                assert torch.equal(sa.memory[name][key], sb.memory[name][key]), (cfg, name, key)
        for name in sa.server_memory:
            assert torch.equal(sa.server_memory[name], sb.server_memory[name]), (cfg, name)
        assert sa.stats.bytes_total == sb.stats.bytes_total and sa.stats.gain == sb.stats.gain, cfg
        flat = gather_flat(a.parameters())
        assert torch.equal(flat[0], flat[1]), f"{cfg}: the ranks' weights differ"


def test_overlapped_exchange_equals_the_synchronous_one_bitwise():
    run_distributed(_equivalence_worker)


def _one_bucket_overflows_worker(rank, world, overlap):
    """Finite but huge values on one rank overflow one bucket's scale: that bucket alone goes
    dense on every rank, its memory stays as it was, the other buckets compress as usual."""
    x, y = make_data(rank)
    model = make_model()
    ddp = wrap(model)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
    state.overlap = overlap
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    target = model[2].weight  # the middle weight: buckets before and after it stay compressed
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: m["residual"].clone() for n, m in state.memory.items()}
    # What every rank's gradient of the target is this step, and the dense average the fallback must give.
    opt.zero_grad()
    # A row of values near fp32's largest: a block's sum |v| (sign's scale) overflows, the values do not.
    poison = 3e38 if rank == 1 else None
    handle = target.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), poison) if poison else g)
    nn.functional.mse_loss(ddp(x), y).backward()
    handle.remove()
    local = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [target])[0]
    if poison:
        local = local.index_fill(0, torch.tensor([0]), poison)
    grads = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(grads, local.contiguous())
    expected = torch.stack(grads).div(world).sum(0)
    assert torch.isfinite(target.grad).all()
    assert torch.allclose(target.grad, expected, rtol=1e-6, atol=0), "the overflowing bucket is averaged densely"
    assert state.stats.fallback_buckets_last_step == 1
    assert state.stats.compressed_last_step, "the other buckets are still compressed"
    for name, mem in state.memory.items():
        if name == names[id(target)]:
            assert torch.equal(mem["residual"], before[name]), "memory of the overflowing bucket changed"
            assert torch.isfinite(mem["residual"]).all()
        else:
            assert not torch.equal(mem["residual"], before[name]), f"{name} was not compressed this step"
    flat = gather_flat([p.grad for p in model.parameters()])
    assert torch.equal(flat[0], flat[1]), "the ranks' averaged gradients differ"
    # Training goes on from the untouched memory, finite and identical on both ranks.
    opt.zero_grad()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    assert state.stats.fallback_buckets_last_step == 0
    flat = gather_flat(model.parameters())
    assert torch.isfinite(flat[0]).all() and torch.equal(flat[0], flat[1])


def test_one_overflowing_bucket_goes_dense_alone_overlapped():
    run_distributed(_one_bucket_overflows_worker, True)


def test_one_overflowing_bucket_goes_dense_alone_synchronous():
    run_distributed(_one_bucket_overflows_worker, False)
