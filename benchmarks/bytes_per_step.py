"""Bytes on the wire per step for every compressor on a ~25M-parameter model, against theory.

Runs 2 gloo ranks on this machine (loopback), trains two steps per compressor and reads
``CompressionState.stats`` of the second step. Theory: each compressed weight of ``n``
elements costs ``n * nominal_bits_per_element / 8`` bytes, and the 1-D tensors go dense.

    python benchmarks/bytes_per_step.py [--out benchmarks/results/bytes_per_step.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _models import steady_state
from lightning_compress import register_compression

CONFIGS = [
    "compressor=none,feedback=none",
    "compressor=fp16,feedback=ef",
    "compressor=bf16,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=dgc,density=0.01,feedback=ef",
    "compressor=randk,density=0.01,feedback=diana",
    "compressor=qsgd,bits=8,feedback=ef",
    "compressor=qsgd,bits=4,block_size=128,feedback=ef",
    "compressor=qsgd,bits=2,feedback=diana",
    "compressor=terngrad,feedback=diana",
    "compressor=natural,feedback=ef",
    "compressor=sign,feedback=ef",
    "compressor=sign,feedback=doublesqueeze",
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 3 x 2048*4096 weights + biases: 25.18M parameters
    return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 4096))


def worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(rank))
    rows = []
    for text in CONFIGS:
        cfg = steady_state(text)
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = register_compression(ddp, cfg)
        times = []
        for _ in range(2):
            ddp.zero_grad()
            t0 = time.perf_counter()
            ddp(x).square().mean().backward()
            times.append(time.perf_counter() - t0)
        comp = cfg.make_compressor()
        compressed = [p for p in model.parameters() if p.dim() > 1 and p.numel() >= cfg.min_numel]
        dense = [p for p in model.parameters() if not (p.dim() > 1 and p.numel() >= cfg.min_numel)]
        n_compressed = sum(p.numel() for p in compressed)
        theory_payload = n_compressed * comp.nominal_bits_per_element() / 8
        theory = theory_payload + 4 * sum(p.numel() for p in dense)
        s = state.stats
        rows.append(
            dict(
                config=text,
                transport=state.transport,
                params=sum(p.numel() for p in model.parameters()),
                bits=comp.nominal_bits_per_element(),
                handed=s.bytes_last_step,
                sent=s.sent_bytes_last_step,
                theory=theory,
                dense=s.dense_bytes_last_step,
                ratio=s.ratio,
                seconds=times[-1],
            )
        )
        del ddp, model, state
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    lines = [
        f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 2 gloo ranks on loopback, {rows[0]['params'] / 1e6:.2f}M parameters "
        f"(3 weights of 2048x4096 compressed, biases dense).",
        "",
        "| config | transport | bits/elem (format) | bytes handed / step | theory | measured / theory "
        "| bytes sent / rank / step | dense allreduce sends | ratio | backward+exchange s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense_sent = r["dense"]  # ring allreduce with 2 ranks sends 2(n-1)/n = 1x its input
        lines.append(
            f"| `{r['config']}` | {r['transport']} | {r['bits']:.3f} | {r['handed']:,} | {r['theory']:,.0f} "
            f"| {r['handed'] / r['theory']:.4f} | {r['sent']:,.0f} | {dense_sent:,} | {r['ratio']:.1f}x | {r['seconds']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Bytes per step on a 25M-parameter model\n\n`python benchmarks/bytes_per_step.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
