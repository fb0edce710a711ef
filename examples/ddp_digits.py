"""Dense and compressed DDP side by side: digits classification on CPU processes (gloo).

Trains the same MLP (64 -> 256 -> 256 -> 10) with plain PyTorch DistributedDataParallel,
first dense and then with each compression configuration registered through
``lightning_compress.register_compression``, and prints one table row per run: test
accuracy, bytes each rank sent per step, compression ratio against dense DDP, and the
median time per training step.

Run from the repository root (it starts its own processes, no launcher needed)::

    python examples/ddp_digits.py
    python examples/ddp_digits.py --epochs 5 \\
        --configs "compressor=sign,feedback=ef;compressor=qsgd,bits=2,block_size=64,feedback=diana"

The data is scikit-learn's bundled digits set (1797 8x8 images), so nothing is
downloaded; the processes talk over 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from digits_data import accuracy, digits, make_mlp
from lightning_compress import CompressionConfig, register_compression

DENSE = "dense"
DEFAULT_CONFIGS = (
    "compressor=sign,feedback=ef",
    "compressor=sign,feedback=doublesqueeze",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef21",
    "compressor=randk,density=0.25,feedback=diana",
    "compressor=qsgd,bits=4,block_size=128,feedback=ef",
)
ADDRESS = "127.0.0.1"


@dataclass
class Result:
    label: str
    accuracy: float
    sent_bytes_per_step: float
    ratio: float
    ms_per_step: float
    steps: int
    diverged: bool = False  # the weights became inf/NaN


# ----- data and model ------------------------------------------------------------------------------
# ----- one run (inside every rank) ------------------------------------------------------------------
def train_one(label: str, args: argparse.Namespace, rank: int, world: int, train_set, test_set) -> Result:
    model = make_mlp(args.hidden, args.seed)  # the same initial weights for every run
    ddp = DistributedDataParallel(model)
    state = None if label == DENSE else register_compression(ddp, CompressionConfig.from_string(label))

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)

    times: list[float] = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # each rank trains on its own half, reshuffled every epoch
        for x, y in loader:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()  # the exchange (dense or compressed) runs in here
            opt.step()
            times.append(time.perf_counter() - start)

    # Every rank must hold the same weights; a mismatch means the exchange is broken.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    finite = torch.tensor([int(bool(torch.isfinite(flat).all()))])
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    diverged = not bool(finite.item())
    if not diverged:
        high, low = flat.clone(), flat
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise RuntimeError(f"{label}: the ranks' weights differ after training")

    dense_handed = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_sent = dense_handed * 2.0 * (world - 1) / world  # ring allreduce, per rank
    if state is None:
        sent, ratio = dense_sent, 1.0
    else:
        stats = state.stats
        sent = stats.sent_bytes_total / max(stats.steps, 1)
        ratio = stats.ratio_total
    skip = min(args.timing_skip, max(len(times) - 1, 0))
    acc = float("nan") if diverged else accuracy(model, test_set)
    return Result(label, acc, sent, ratio, 1000.0 * statistics.median(times[skip:]), len(times), diverged)


def worker(rank: int, world: int, port: int, labels: list[str], args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = ADDRESS
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout)
    )
    try:
        train_set, test_set = digits(args.seed)
        results = []
        for label in labels:
            results.append(train_one(label, args, rank, world, train_set, test_set))
            if rank == 0 and not args.quiet:
                r = results[-1]
                outcome = "diverged (inf/NaN weights)" if r.diverged else f"test accuracy {100 * r.accuracy:.2f}%"
                print(f"  done: {label} ({r.steps} steps, {outcome})", flush=True)
        if rank == 0:
            print_table(results, args, world, len(train_set), len(test_set))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----- output ---------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{n:.0f} B"


def print_table(results: list[Result], args, world: int, n_train: int, n_test: int) -> None:
    width = max(len("config"), *(len(r.label) for r in results))
    header = f"{'config':<{width}} | {'test acc':>8} | {'sent/step/rank':>14} | {'ratio':>7} | {'ms/step':>7}"
    print()
    print(
        f"digits: {n_train} train / {n_test} test, {world} rank{'s' if world > 1 else ''} (gloo, CPU), "
        f"{args.epochs} epochs, "
        f"batch {args.batch_size} per rank, SGD lr={args.lr} momentum={args.momentum}, seed {args.seed}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.label:<{width}} | {'diverged' if r.diverged else f'{100 * r.accuracy:7.2f}%':>8} | "
            f"{human_bytes(r.sent_bytes_per_step):>14} | "
            f"{r.ratio:6.1f}x | {r.ms_per_step:7.2f}"
        )
    print(
        "sent/step/rank: bytes each rank transmits per step (dense: ring allreduce, 2(n-1)/n of the gradient); "
        "ratio: dense over compressed; ms/step: median on rank 0, first "
        f"{args.timing_skip} steps left out.",
        flush=True,
    )


# ----- command line ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ADDRESS, 0))
        return s.getsockname()[1]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="ddp_digits.py",
        description=(
            "Train an MLP on scikit-learn's digits with data-parallel DDP on CPU processes\n"
            "(gloo, 127.0.0.1 only): dense first, then each compression config, and print\n"
            "test accuracy, bytes sent per step, compression ratio and time per step side by side."
        ),
        epilog="default configs:\n  " + "\n  ".join(DEFAULT_CONFIGS) + "\n\nexample:\n  python examples/ddp_digits.py "
        "--epochs 5 --configs 'compressor=sign,feedback=ef;compressor=natural,feedback=diana'",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--configs",
        default=argparse.SUPPRESS,
        metavar="'CONFIG;CONFIG;...'",
        help="compression configs separated by ';', each in the inline form 'key=value,...' of "
        "CompressionConfig, e.g. 'compressor=topk,density=0.01,feedback=ef21' (default: the list below). "
        "Dense DDP always runs first, as the baseline.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per config")
    parser.add_argument("--world-size", type=int, default=2, help="number of processes (ranks)")
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 for the process group; 0 picks a free one"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per rank")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, the initial weights and the shuffling"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--timing-skip", type=int, default=10, help="first steps of each run left out of the median step time"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds a collective may wait before the run fails"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)

    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1; got {args.epochs}")
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1; got {args.world_size}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535]; got {args.port}")
    if args.batch_size < 1 or args.hidden < 1 or args.threads < 1 or args.timing_skip < 0:
        parser.error("--batch-size, --hidden and --threads must be >= 1 and --timing-skip >= 0")

    labels = [DENSE]
    args.configs = getattr(args, "configs", None)
    texts = DEFAULT_CONFIGS if args.configs is None else args.configs.split(";")
    for text in (part.strip() for part in texts):
        if not text or text == DENSE or text in labels:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                CompressionConfig.from_string(text)  # fail here, before any process starts
        except (ValueError, TypeError) as err:
            parser.error(f"bad config {text!r}: {err}")
        labels.append(text)
    return args, labels


def main(argv: list[str] | None = None) -> None:
    args, labels = parse_args(argv)
    port = args.port or free_port()
    start = time.perf_counter()
    mp.spawn(worker, args=(args.world_size, port, labels, args), nprocs=args.world_size, join=True)
    if not args.quiet:
        print(f"total wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
