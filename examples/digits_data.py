"""The digits task shared by the examples and benchmarks: data split, MLP, accuracy.

scikit-learn's bundled digits set (1797 8x8 images), so nothing is downloaded. Imports only
torch and scikit-learn (not lightning_compress), so a process that needs just the task does not
pay for importing Lightning.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["digits", "make_mlp", "accuracy"]


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Stratified 80/20 train/test split of scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)

    def as_dataset(a, b) -> TensorDataset:
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))

    return as_dataset(x_tr, y_tr), as_dataset(x_te, y_te)


def make_mlp(hidden: int, seed: int | None = None) -> nn.Module:
    """64 -> hidden -> hidden -> 10 MLP; its weight matrices are large enough to be compressed.

    ``seed`` seeds torch's generator first; ``None`` leaves it as the caller set it.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy of ``model`` on a (features, labels) dataset, in eval mode."""
    model.eval()
    x, y = data.tensors
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc
