"""Bytes each rank sends per step on 2, 4 and 8 ranks, counted from the collectives themselves.

Starts ``N`` gloo ranks on 127.0.0.1 for each ``N`` in ``--worlds``, trains an MLP of 6.3M
parameters (1024-2048-1024-2048, the shape of :mod:`_models`' MLP at half the width, so that 8
ranks fit in the memory of a small machine) with dense DDP and each configuration (``transport="auto"``, which picks
the transport from ``N``), and counts, during the timed steps, the input of every
``all_reduce``, ``all_gather`` and ``all_to_all`` a rank issues, weighted by what that
collective makes a rank transmit in the usual algorithms: ``2(N-1)/N`` of an allreduce input
(ring), ``N-1`` times an all_gather input, ``(N-1)/N`` of an all_to_all input. The library's
own count (``state.stats.sent_bytes_last_step``) is printed beside it.

    python benchmarks/scale_bytes.py [--worlds 2,4,8] [--configs "compressor=sign,feedback=ef;..."]
                                     [--out benchmarks/results/scale_bytes.md]

Goal: for the recommended configurations, bytes per rank per step grow by at most 2x from 2 to
8 ranks (two compressed passes ideally 1.75x).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _machine import cpu_model, free_port  # noqa: E402
from _models import random_batches, steady_state  # noqa: E402

DEFAULT_CONFIGS = (
    "dense",
    "compressor=sign,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=sign,feedback=doublesqueeze",
    "compressor=randk,density=0.01,feedback=diana",
    "compressor=topk,density=0.01,feedback=ef21",
    "compressor=powersgd,powersgd_rank=4,feedback=ef",
)
RECOMMENDED = (*DEFAULT_CONFIGS[1:4], DEFAULT_CONFIGS[-1])
GOAL = 2.0


class Counter:
    """Bytes this rank transmits in the collectives issued while ``on``."""

    def __init__(self) -> None:
        self.sent, self.on = 0.0, False

    def install(self) -> None:
        import lightning_compress.collectives as collectives

        n = dist.get_world_size()
        factors = {"all_reduce": 2.0 * (n - 1) / n, "all_gather_into_tensor": float(n - 1),
                   "all_gather_single": float(n - 1), "all_to_all_single": (n - 1) / n}  # fmt: skip
        for name, factor in factors.items():
            original = getattr(dist, name, None)
            if original is None:  # all_gather_single: newer PyTorch only
                continue

            def counted(*args, _original=original, _factor=factor, _name=name, **kwargs):
                if self.on:
                    # the input: all_reduce(tensor), all_gather_into_tensor(out, input), all_to_all_single(out, input)
                    tensor = args[0] if _name == "all_reduce" else args[1]
                    self.sent += tensor.numel() * tensor.element_size() * _factor
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
            if collectives._all_gather_single is original:  # bound at import, under either name
                collectives._all_gather_single = counted


def worker(rank: int, world: int, port: int, configs: list[str], steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    import warnings

    from lightning_compress import register_compression

    warnings.simplefilter("ignore", UserWarning)
    counter = Counter()
    counter.install()
    rows = {}
    try:
        for cfg in configs:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 2048))
            ddp = DistributedDataParallel(model)
            state = None
            if cfg == "dense":  # PyTorch's own allreduce hook: DDP's built-in average, through dist.all_reduce
                ddp.register_comm_hook(None, default_hooks.allreduce_hook)
            else:
                state = register_compression(ddp, steady_state(cfg))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
            batches = random_batches(model, 8, rank, count=2)
            sent, own = [], []
            for step in range(steps + 1):
                x, y = batches[step % 2]
                counter.sent, counter.on = 0.0, step > 0  # the first step: buckets not yet rebuilt
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                counter.on = False
                if step > 0:
                    sent.append(counter.sent)
                    own.append(state.stats.sent_bytes_last_step if state is not None else None)
            rows[cfg] = {"sent": sent, "own": own, "transport": state.transport if state else "allreduce",
                         "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
            del ddp, model, opt, state
            gc.collect()
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale_bytes.md"))
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    configs = [c for c in args.configs.split(";") if c]
    results, start = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = os.path.join(tmp, f"{world}.json")
            mp.spawn(worker, args=(world, free_port(), configs, args.steps, out), nprocs=world, join=True)
            results[world] = json.loads(Path(out).read_text())
            print(f"{world} ranks done ({time.time() - start:.0f} s)", flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({str(w): r for w, r in results.items()}, indent=1))
    text = report(results, worlds, configs, args)
    Path(args.out).write_text(text)
    print(text)


def report(results: dict, worlds: list[int], configs: list[str], args) -> str:
    first, last = worlds[0], worlds[-1]
    params = results[first][configs[0]]["params"]
    lines = [
        "# Bytes per rank against the number of ranks",
        "",
        f"Machine: {cpu_model()}; torch {torch.__version__}; gloo ranks on 127.0.0.1.",
        f"Command: `{' '.join(['python benchmarks/scale_bytes.py', *sys.argv[1:]])}`",
        "",
        f"An MLP 1024-2048-1024-2048 ({params} parameters, 6 tensors; the 3 biases, 5120 elements, stay dense), "
        "`transport=auto`. Each cell: what one rank transmits per step, counted from the collectives it issued "
        f"during {args.steps} steps after the first (ring allreduce 2(N-1)/N of its input, all_gather N-1 times, "
        "all_to_all (N-1)/N), with the transport `auto` chose; in brackets, the library's own count "
        "(`state.stats.sent_bytes_last_step`).",
        "",
        "| configuration | " + " | ".join(f"{w} ranks" for w in worlds) + f" | {last} / {first} ranks | goal |",
        "|---|" + "---:|" * len(worlds) + "---:|---|",
    ]
    for cfg in configs:
        cells = []
        for w in worlds:
            r = results[w][cfg]
            sent = max(r["sent"])
            own = "" if r["own"][0] is None else f" [{max(r['own']) / 1e6:.2f}]"
            cells.append(f"{sent / 1e6:.2f} MB{own} ({r['transport']})")
        growth = max(results[last][cfg]["sent"]) / max(results[first][cfg]["sent"])
        goal = f"<= {GOAL:g}x: {'met' if growth <= GOAL else 'not met'}" if cfg in RECOMMENDED else ""
        lines.append(f"| `{cfg}` | " + " | ".join(cells) + f" | {growth:.2f}x | {goal} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
