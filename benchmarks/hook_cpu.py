"""CPU time of the compression hook per training step, against one ``add_`` over the same elements.

Starts ``--world`` gloo ranks on 127.0.0.1 (one intra-op thread each), trains the shared
workloads (:mod:`_models`: the 25.2M-parameter MLP and the 242-tensor ``blocks`` stack) with
each configuration, and counts the CPU time of the calling thread spent in the hook's own
work: compressing and launching (the hook call), the later passes it issues, and decoding in
the completion callbacks (``time.thread_time``, so neither waiting for the network nor the
other rank's load is counted). ``add_`` (``y += x`` over the model's fp32 elements) is timed
the same way in the same process, right after each configuration, and every figure is a
median over the timed steps of rank 0.

    python benchmarks/hook_cpu.py [--models mlp,blocks] [--configs "compressor=sign,feedback=ef;..."]
                                  [--steps 10] [--optimizer sgd|adamw] [--out benchmarks/results/hook_cpu.md]

``--optimizer adamw`` trains with AdamW attached to the exchange (``attach_optimizer``), so the
hook also runs the optimizer's moved momentum (or, with ``momentum=adam_step``, Adam's step);
the default is plain SGD, nothing attached.

Goals (1 thread, 25M elements): sign+ef at most 4x one ``add_``, top-k 1% + ef at most 8x.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# The repository's own package first (over an installed one), then this folder.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _machine import cpu_model, free_port  # noqa: E402
from _models import make_model, random_batches, steady_state  # noqa: E402

DEFAULT_CONFIGS = (
    "compressor=sign,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=sign,feedback=doublesqueeze",
    "compressor=topk,density=0.01,feedback=ef21",
)
GOALS = {"compressor=sign,feedback=ef": 4.0, "compressor=topk,density=0.01,feedback=ef": 8.0}


class CpuMeter:
    """Thread CPU seconds spent inside the hook's work, summed over threads, for one step."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)
        meter = self

        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                meter.seconds += time.thread_time() - t0

        setattr(owner, name, timed)


def instrument() -> CpuMeter:
    """Count the hook's CPU time: the hook call itself, the later passes and the callbacks."""
    from lightning_compress import exchange

    meter = CpuMeter()
    meter.wrap(exchange.CompressedFlight, "__init__")
    meter.wrap(exchange.CompressedFlight, "issue_next")
    meter.wrap(exchange.CompressedFlight, "_finish")
    return meter


def add_seconds(numel: int, repeats: int = 7) -> float:
    a, b = torch.randn(numel), torch.randn(numel)
    a.add_(b)
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        a.add_(b)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def run_config(model_name: str, cfg: str, args, rank: int, meter: CpuMeter) -> dict:
    from lightning_compress import attach_optimizer, register_compression

    model = make_model(model_name, args.quick)
    numel = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(model)
    state = register_compression(ddp, steady_state(cfg))
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        attach_optimizer(state, opt)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = random_batches(model, args.batch, rank)
    cpu, encode, decode = [], [], []
    for i in range(args.warmup + args.steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=False)
        meter.seconds = 0.0
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if i >= args.warmup:
            cpu.append(meter.seconds)
            encode.append(state.stats.encode_seconds_last_step)
            decode.append(state.stats.decode_seconds_last_step)
    add = add_seconds(numel)
    compressed = sum(p.numel() for p in model.parameters() if p.dim() > 1 and p.numel() >= state.config.min_numel)
    return {
        "model": model_name, "config": cfg, "numel": numel, "compressed": compressed,
        "tensors": len(list(model.parameters())), "cpu_ms": 1e3 * statistics.median(cpu),
        "add_ms": 1e3 * add, "encode_wall_ms": 1e3 * statistics.median(encode),
        "decode_wall_ms": 1e3 * statistics.median(decode),
    }  # fmt: skip


def worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        meter = instrument()
        rows = []
        for model_name in args.models.split(","):
            for cfg in args.configs.split(";"):
                rows.append(run_config(model_name, cfg, args, rank, meter))
                if rank == 0:
                    r = rows[-1]
                    print(f"  {model_name:6s} {cfg:45s} {r['cpu_ms']:8.1f} ms = {r['cpu_ms'] / r['add_ms']:5.2f}x add_",
                          flush=True)  # fmt: skip
        if rank == 0:
            Path(out_path).write_text(report(rows, args, world))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def report(rows: list[dict], args, world: int) -> str:
    lines = [
        "# Hook CPU time per step",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} (torch {torch.__version__}); "
        f"{world} gloo ranks on 127.0.0.1, 1 intra-op thread each; optimizer: "
        + ("AdamW, attached to the exchange." if args.optimizer == "adamw" else "SGD without momentum, nothing attached."),
        f"Command: `python benchmarks/hook_cpu.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"CPU time (`time.thread_time`) of the hook's own work per step: the hook calls, the later passes "
        f"and the decode callbacks; median of {args.steps} steps after {args.warmup} warm-up steps, rank 0. "
        "`add_` is `y += x` over the model's fp32 elements, timed the same way right after.",
        "",
        "| model | params (tensors) | config | hook CPU ms | add_ ms | x add_ | goal |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r["cpu_ms"] / r["add_ms"]
        goal = GOALS.get(r["config"]) if r["model"] == "mlp" else None
        verdict = "" if goal is None else (f"<= {goal:g}: {'met' if ratio <= goal else 'not met'}")
        lines.append(
            f"| {r['model']} | {r['numel'] / 1e6:.2f}M ({r['tensors']}) | `{r['config']}` | {r['cpu_ms']:.1f} | "
            f"{r['add_ms']:.1f} | {ratio:.2f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,blocks")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="adamw: attached to the exchange")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hook_cpu.md"))
    args = p.parse_args(argv)
    mp.start_processes(worker, args=(args.world, free_port(), args, args.out), nprocs=args.world, start_method="spawn")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
