"""Digits classification with Lightning DDP, dense or compressed, on 2 CPU processes.

Train once with a strategy chosen by name::

    python examples/lightning_digits.py --strategy compressed_ddp_spawn --compressor sign --feedback doublesqueeze

Let GraVAC choose the compression factor of top-k online (window shortened for a short run)::

    python examples/lightning_digits.py --compressor topk --feedback ef --gravac "window=20"

Compare dense DDP with compressed configurations side by side (accuracy, bytes per step, time per step)::

    python examples/lightning_digits.py --compare "compressor=sign,feedback=doublesqueeze" \
        "compressor=topk,density=0.01,feedback=ef"

The data is scikit-learn's bundled digits set (1797 8x8 images), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_compress  # noqa: F401  (registers the compressed_ddp* strategy names)
from digits_data import digits
from lightning_compress.callbacks import GraVAC
from lightning_compress.strategy import CompressedDDPStrategy, build_config


class DigitsClassifier(pl.LightningModule):
    """A two-layer MLP; its weight matrices (64x256, 256x10) are large enough to be compressed."""

    def __init__(self, hidden: int = 256, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr
        self.test_accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    @torch.no_grad()
    def accuracy(self, dataset: TensorDataset) -> float:
        """Test accuracy in this process (after a spawn run, the main process holds rank 0's weights)."""
        self.test_accuracy.reset()
        x, y = dataset.tensors
        self.test_accuracy.update(self(x).argmax(dim=1), y)
        return float(self.test_accuracy.compute())


class StepTimer(Callback):
    """Logs ``time_per_step``: mean seconds per training batch, leaving out the first (DDP bucket rebuild)."""

    def __init__(self) -> None:
        self._start = 0.0
        self._total, self._count = 0.0, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, batch: Any, idx: int):
        if trainer.global_step > 1:
            self._total += time.perf_counter() - self._start
            self._count += 1
        if self._count:
            pl_module.log("time_per_step", self._total / self._count, on_step=True, rank_zero_only=True)


def train(strategy: str | pl.strategies.Strategy, epochs: int = 20, devices: int = 2, batch_size: int = 32,
          lr: float = 0.05, seed: int = 0, callbacks: list[Callback] = (), logger: Any = False) -> dict[str, Any]:
    """Train on ``devices`` CPU processes; returns test accuracy, bytes sent per step and time per step."""
    train_set, test_set = digits(seed)
    model = DigitsClassifier(lr=lr, seed=seed)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=epochs,
        callbacks=[StepTimer(), *callbacks], logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, DataLoader(train_set, batch_size=batch_size, shuffle=True))
    metrics = trainer.callback_metrics
    dense = sum(p.numel() * p.element_size() for p in model.parameters()) * 2.0 * (devices - 1) / devices
    sent = float(metrics["compression/bytes_sent"]) if "compression/bytes_sent" in metrics else dense
    # Every rank draws ceil(n / devices) samples per epoch (DistributedSampler pads), in full or partial batches.
    steps = epochs * math.ceil(math.ceil(len(train_set) / devices) / batch_size)
    return {
        "accuracy": model.accuracy(test_set),
        "steps": steps,
        "bytes_total": float(metrics.get("compression/bytes_sent_total", dense * steps)),
        "dense_bytes_total": dense * steps,
        "bytes_per_step": sent,
        "ratio": dense / sent if sent else float("inf"),
        "time_per_step": float(metrics.get("time_per_step", float("nan"))),
        "rank": trainer.global_rank,  # with the popen launcher every rank runs this script
    }


def gravac_options(text: str) -> dict[str, Any]:
    """``"theta_min=10,window=20,scaling=geometric"`` to GraVAC keyword arguments."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return options


def _compressed_strategy(name: str, options: dict[str, Any]) -> CompressedDDPStrategy:
    start = {"compressed_ddp": "popen", "compressed_ddp_spawn": "spawn"}.get(name, "fork")
    return CompressedDDPStrategy(start_method=start, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="compressed_ddp_spawn", help="a registered strategy name")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    for name, kind in (("compressor", str), ("density", float), ("bits", int), ("feedback", str), ("transport", str),
                       ("warmup-steps", int), ("min-numel", int), ("block-size", int), ("diana-alpha", float)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--gravac", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                        help="adapt the compression factor with the GraVAC callback (compressor topk, dgc or qsgd)")
    parser.add_argument("--compare", nargs="*", metavar="CONFIG", default=None,
                        help='run dense DDP and each "key=value,..." config, then print a table')
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    common = dict(epochs=args.epochs, devices=args.devices, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    options = {k: getattr(args, k) for k in ("compressor", "density", "bits", "feedback", "transport", "warmup_steps",
                                            "min_numel", "block_size", "diana_alpha")}
    options = {k: v for k, v in options.items() if v is not None}

    if args.compare is None:
        strategy: Any = _compressed_strategy(args.strategy, options) if options else args.strategy
        callbacks = [] if args.gravac is None else [GraVAC(**gravac_options(args.gravac))]
        result = train(strategy, callbacks=callbacks, **common)
        if result["rank"] == 0:
            print(result)
        return

    name = args.strategy if args.strategy.startswith("compressed_") else "compressed_ddp_spawn"
    dense_name = name.replace("compressed_", "", 1)
    runs = [("dense " + dense_name, dense_name)]
    for text in args.compare or ["compressor=sign,feedback=doublesqueeze", "compressor=topk,density=0.01,feedback=ef"]:
        config = build_config(text, **options)
        runs.append((text, _compressed_strategy(name, config.to_dict())))
    rows = [(label, train(strategy, **common)) for label, strategy in runs]
    if rows[0][1]["rank"] != 0:
        return
    print(f"\n{'configuration':45s} {'accuracy':>9s} {'bytes/step':>11s} {'ratio':>7s} {'ms/step':>8s}")
    for label, r in rows:
        print(f"{label:45s} {100 * r['accuracy']:8.2f}% {r['bytes_per_step']:11.0f} {r['ratio']:7.1f} "
              f"{1000 * r['time_per_step']:8.2f}")


if __name__ == "__main__":
    main()
