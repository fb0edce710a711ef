"""The communication-bound workloads the benchmarks share, with random data (no download).

* ``mlp``: 25.18M parameters in 6 tensors (three 2048x4096 weights and their biases).
* ``blocks``: 24.9M parameters in 242 tensors, a stack of 20 pre-norm residual blocks of width
  320 (attention-shaped projections and a 4x MLP, two LayerNorms each): the many mid-sized
  2-D weights and many small 1-D tensors of a transformer, without attention itself.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "make_model", "random_batches", "steady_state"]


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        x = x + self.proj(torch.tanh(q) * k + v)  # a cheap stand-in for attention, same shapes
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class Blocks(nn.Module):
    def __init__(self, d: int = 320, depth: int = 20, classes: int = 320):
        super().__init__()
        self.blocks = nn.Sequential(*(_Block(d) for _ in range(depth)))
        self.head = nn.Linear(d, classes)
        self.in_features, self.out_features = d, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _mlp(quick: bool) -> nn.Module:
    d, h = (256, 512) if quick else (2048, 4096)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d), nn.ReLU(), nn.Linear(d, h))


def _blocks(quick: bool) -> nn.Module:
    return Blocks(64, 4, 64) if quick else Blocks()


MODELS = {"mlp": _mlp, "blocks": _blocks}


def make_model(name: str, quick: bool = False) -> nn.Module:
    """The workload ``name`` with fixed initial weights (seed 0); ``quick``: a small version."""
    torch.manual_seed(0)
    return MODELS[name](quick)


def _widths(model: nn.Module) -> tuple[int, int]:
    if isinstance(model, nn.Sequential):
        return model[0].in_features, model[-1].out_features
    return model.in_features, model.out_features


def random_batches(model: nn.Module, batch: int, seed: int, count: int = 4):
    """``count`` fixed random batches (inputs, class labels over the output width) for one rank."""
    gen = torch.Generator().manual_seed(1000 + seed)
    d_in, d_out = _widths(model)
    return [(torch.randn(batch, d_in, generator=gen), torch.randint(0, d_out, (batch,), generator=gen))
            for _ in range(count)]  # fmt: skip


def steady_state(config: str):
    """The :class:`~lightning_compress.CompressionConfig` of ``config`` (inline form), with the
    density warm-up off where it is on only by default.

    The timed and counted steps of these benchmarks measure what a step costs once training runs;
    ``topk``/``dgc``'s default warm-up (100 steps that keep more) would cover all of them.
    """
    from lightning_compress import CompressionConfig

    return CompressionConfig.from_string(config).without_default_density_warmup()

