"""A plain Hugging Face Accelerate training loop: an MLP on scikit-learn's digits (CPU-friendly).

Nothing in this script is specific to gradient compression; turn it on at launch::

    accelerate-compress launch --cpu --num_processes 2 --compressor sign examples/accelerate_digits.py
    ACCELERATE_COMPRESSION="compressor=sign,feedback=doublesqueeze" \\
        accelerate-compress launch --cpu --num_processes 2 examples/accelerate_digits.py

and compare with dense data-parallel training::

    accelerate-compress launch --cpu --num_processes 2 examples/accelerate_digits.py

(On a machine without GPUs, plain ``accelerate launch --cpu --num_processes 2`` starts one process unless
mpirun is configured; ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` starts two.)
The data is bundled with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from digits_data import digits, make_mlp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--output", default=None, help="folder: each rank writes rank<r>.json (accuracy, weights hash)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)
    train_set, test_set = digits(args.seed)
    model = make_mlp(args.hidden)  # set_seed above fixed the initial weights
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    # Sized for one process, as Accelerate expects: the prepared scheduler steps once per process per step.
    total = args.epochs * -(-len(loader) // args.gradient_accumulation_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    model.train()
    for epoch in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        accelerator.print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (accelerator.unwrap_model(model)(x).argmax(dim=1) == y).float().mean().item()
    accelerator.print(f"test accuracy: {100 * accuracy:.2f}% ({accelerator.num_processes} processes)")
    if args.output:
        weights = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
        os.makedirs(args.output, exist_ok=True)
        record = {"accuracy": accuracy, "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
        with open(os.path.join(args.output, f"rank{accelerator.process_index}.json"), "w") as handle:
            json.dump(record, handle)
    accelerator.end_training()


if __name__ == "__main__":
    main()
