"""Accuracy per epoch of compressed against dense DDP, with SGD + momentum and AdamW.

Trains on 2 gloo ranks (``--world`` for more; plain DDP, ``register_compression`` + ``attach_optimizer`` as the
Lightning and Fabric strategies and Accelerate's ``enable()`` do), each rank on a fixed half
of scikit-learn's digits (reshuffled within the half every epoch), batch 32 per rank, and
records the test accuracy after every epoch and the bytes each rank sent. Two models: the
64-256-256-10 MLP of the examples and a small CNN on the 8x8 images. Every cell is a mean
over seeds.

    python benchmarks/convergence.py [--tasks mlp,cnn] [--optimizers sgd,adamw] [--seeds 0,1,2]
                                     [--epochs 20] [--configs "compressor=sign,feedback=ef;..."]
                                     [--schedule constant|cosine] [--world 2] [--out benchmarks/results/convergence]

Writes ``<out>.md`` (tables at epochs 2, 5, 10 and 20, and the largest shortfall against dense
from epoch 5 on), ``<out>.json`` and, with matplotlib, ``<out>.png`` (accuracy against epochs
and against bytes sent). ``--schedule cosine`` decays the learning rate to 0 over the run
(``CosineAnnealingLR`` stepped every step) for dense and compressed alike. ``--dense-from
other.json`` adds a column with the gap to dense as that run trained it (the same task and
optimizer, at that run's learning rate): how far a configuration at another learning rate is
from dense at the user's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
# The repository's own package first (over an installed one), then the examples and this folder.
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

from _machine import cpu_model, free_port  # noqa: E402
from digits_data import accuracy, digits, make_mlp  # noqa: E402

DENSE = "dense"
RECOMMENDED = (
    "compressor=sign,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef21",
    "compressor=sign,feedback=doublesqueeze",
)
OPTIMIZERS = {
    "sgd": ("SGD, lr 0.05, momentum 0.9", lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)),
    "adamw": ("AdamW, lr 1e-3, weight decay 0.01", lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)),
}


def optimizer_spec(name: str):
    """``(title, factory)`` of ``sgd``, ``adamw``, or either with another learning rate (``sgd@0.02``)."""
    base, _, lr = name.partition("@")
    title, factory = OPTIMIZERS[base]
    if not lr:
        return title, factory
    kind = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    extra = dict(momentum=0.9) if base == "sgd" else dict(weight_decay=0.01)
    return title.replace(title.split(", ")[1], f"lr {lr}"), lambda params: kind(params, lr=float(lr), **extra)
EPOCHS_SHOWN = (2, 5, 10, 20)


def make_cnn(seed: int) -> nn.Module:
    """A small CNN on the 8x8 digits: two 3x3 convolutions, a pooling, two linear layers (151k parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


TASKS = {"mlp": lambda seed: make_mlp(256, seed), "cnn": make_cnn}


def train(task: str, opt_name: str, label: str, seed: int, epochs: int, rank: int, world: int, data,
          schedule: str = "constant") -> dict:  # fmt: skip
    from lightning_compress import attach_optimizer, register_compression

    train_set, test_set = data
    model = TASKS[task](seed)
    ddp = DistributedDataParallel(model)
    opt = optimizer_spec(opt_name)[1](ddp.parameters())
    state = None
    if label != DENSE:
        state = register_compression(ddp, label)
        attach_optimizer(state, opt)
    half = Subset(train_set, range(rank, len(train_set), world))  # a fixed half per rank
    loader = DataLoader(half, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed * 100 + rank))
    dense_bytes = 4.0 * sum(p.numel() for p in model.parameters()) * 2.0 * (world - 1) / world  # ring, per step
    scheduler = None
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    acc, sent, steps = [], [], 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
        acc.append(accuracy(model, test_set))
        sent.append(state.stats.sent_bytes_total if state is not None else dense_bytes * steps)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"{label}: the ranks' weights differ")
    mode = state.momentum.mode if state is not None and state.momentum is not None else "optimizer"
    return {"task": task, "optimizer": opt_name, "config": label, "seed": seed, "acc": acc, "sent": sent,
            "momentum": mode, "steps": steps}  # fmt: skip


def worker(rank: int, world: int, port: int, args, out_json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        runs = []
        data = {seed: digits(seed) for seed in args.seeds}
        for task in args.tasks:
            for opt_name in args.optimizers:
                for label in [DENSE, *args.configs]:
                    for seed in args.seeds:
                        run = train(task, opt_name, label, seed, args.epochs, rank, world, data[seed], args.schedule)
                        runs.append(run)
                        if rank == 0:
                            r = runs[-1]
                            print(f"  {task} {opt_name} {label} seed {seed}: "
                                  + " ".join(f"{100 * a:.1f}" for a in r["acc"]), flush=True)  # fmt: skip
                            Path(out_json).write_text(json.dumps(runs))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----- report -------------------------------------------------------------------------------------
def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.fmean(r[key][e] for r in runs) for e in range(len(runs[0][key]))]


def largest_gap(reference: list[float], curve: list[float]) -> float:
    """The largest shortfall of ``curve`` against ``reference`` from epoch 5 on, in points."""
    return max((100 * (d - a) for d, a in list(zip(reference, curve))[4:]), default=float("nan"))


def _world(args) -> int:
    return getattr(args, "world", 2)


def _training_command() -> str:
    """This run's arguments, without ``--from-json`` (the command that trains), shell-quoted."""
    return " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--from-json")


def report(runs: list[dict], args) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["optimizer"], r["config"]), []).append(r)
    shown = [e for e in EPOCHS_SHOWN if e <= args.epochs]
    lines = [
        "# Convergence: test accuracy per epoch, compressed against dense",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} (torch {torch.__version__}); "
        f"{_world(args)} gloo ranks, 1 thread each.",
        f"Command: `python benchmarks/convergence.py {_training_command()}`".rstrip(),
        "",
        f"Digits, each rank a fixed {'half' if _world(args) == 2 else f'1/{_world(args)}'} of the training set, "
        f"batch 32 per rank, {args.epochs} epochs"
        + (", learning rate decayed to 0 by a cosine schedule over the run" if args.schedule == "cosine" else "")
        + "; mean over "
        f"seeds {', '.join(map(str, args.seeds))} (min-max in brackets). The optimizer's momentum goes where "
        "`momentum=auto` puts it: into the exchange with the look-ahead, for SGD with momentum and for AdamW; "
        "with DoubleSqueeze on 2 ranks, AdamW's whole step (`adam_step`) runs on each rank before the exchange "
        "(`lightning_compress/momentum.py`). *Gap* is the largest shortfall of the mean "
        "against dense at any epoch from 5 on (goal: at most 1 point on digits' MLP, 2 on the CNN).",
    ]
    other: dict[tuple, list[dict]] = {}
    if args.dense_from:
        for r in json.loads(Path(args.dense_from).read_text()):
            if r["config"] == DENSE:
                other.setdefault((r["task"], r["optimizer"].partition("@")[0]), []).append(r)
        lines += [
            "",
            f"*Gap to {Path(args.dense_from).stem}* compares with dense of that run, {args.dense_from}: the same "
            "task and optimizer at that run's learning rate.",
        ]
    for task in args.tasks:
        for opt_name in args.optimizers:
            dense = groups.get((task, opt_name, DENSE))
            if not dense:
                continue
            dense_mean = mean_curve(dense, "acc")
            ref = other.get((task, opt_name.partition("@")[0]))
            ref_mean = mean_curve(ref, "acc") if ref else None
            extra = f" gap to {Path(args.dense_from).stem} |" if ref_mean else ""
            lines += ["", f"## {task}, {optimizer_spec(opt_name)[0]}", "",
                      "| config | " + " | ".join(f"epoch {e}" for e in shown) + " | gap |" + extra + " MB sent per rank |",
                      "|---|" + "---:|" * (len(shown) + 2 + bool(ref_mean))]  # fmt: skip
            for label in [DENSE, *args.configs]:
                runs_ = groups.get((task, opt_name, label))
                if not runs_:
                    continue
                cells = []
                for e in shown:
                    vals = [100 * r["acc"][e - 1] for r in runs_]
                    cells.append(f"{statistics.fmean(vals):.1f} ({min(vals):.0f}-{max(vals):.0f})")
                m = mean_curve(runs_, "acc")
                cells.append(f"{largest_gap(dense_mean, m) if label != DENSE else 0.0:+.1f}")
                if ref_mean:
                    cells.append(f"{largest_gap(ref_mean, m):+.1f}")
                mb = statistics.fmean(r["sent"][-1] for r in runs_) / 1e6
                lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {mb:.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, o) for t in args.tasks for o in args.optimizers]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (task, opt_name) in enumerate(panels):
        for label in [DENSE, *args.configs]:
            runs_ = [r for r in runs if (r["task"], r["optimizer"], r["config"]) == (task, opt_name, label)]
            if not runs_:
                continue
            acc = [100 * a for a in mean_curve(runs_, "acc")]
            sent = [s / 1e6 for s in mean_curve(runs_, "sent")]
            name = label.replace("compressor=", "").replace("feedback=", "").replace("density=", "d=")
            axes[0][col].plot(range(1, len(acc) + 1), acc, marker=".", label=name)
            axes[1][col].plot(sent, acc, marker=".", label=name)
        axes[0][col].set_title(f"{task}, {opt_name}")
        axes[0][col].set_xlabel("epoch")
        axes[1][col].set_xlabel("MB sent per rank (log)")
        axes[1][col].set_xscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_ylabel("test accuracy %")
            ax.set_ylim(50, 100)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="mlp,cnn")
    p.add_argument("--optimizers", default="sgd,adamw")
    p.add_argument("--configs", default=";".join(RECOMMENDED))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="the learning rate: constant, or decayed to 0 by a per-step cosine")  # fmt: skip
    p.add_argument("--dense-from", default=None, help="another run's .json: also give the gap to its dense runs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "convergence"))
    p.add_argument("--from-json", action="store_true", help="rewrite the report from <out>.json, without training")
    p.add_argument("--world", type=int, default=2, help="gloo ranks, each on a fixed 1/world of the training set")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error(f"--world must be at least 2, got {args.world}")
    args.tasks = args.tasks.split(",")
    args.optimizers = args.optimizers.split(",")
    args.configs = [c for c in args.configs.split(";") if c and c != DENSE]  # dense is always run first
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        mp.start_processes(worker, args=(args.world, free_port(), args, str(out.with_suffix(".json"))),
                           nprocs=args.world, start_method="spawn")  # fmt: skip
    runs = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".md").write_text(report(runs, args))
    try:
        plot(runs, args, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
