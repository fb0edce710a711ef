"""Time and effective bandwidth of every kernel op against ``add_`` on the same tensor.

For each size, every op runs on the path given (default: the one ``auto`` picks for the
device), ``add_`` (``y += x``: read 8 bytes, write 4 per element) is timed in the same
run, and each op is reported as median time, effective GB/s (the bytes it must move,
counted below) and ratio to ``add_``. ``--twin`` adds the torch twins for comparison.

    python benchmarks/kernel_ops.py [--sizes 1M,25M,100M] [--device cpu|cuda] [--path auto]
                                 [--twin] [--out benchmarks/results/kernels_cpu.md]

Bytes per element counted for n elements (R = 2 payloads decoded):
  sign_ef           x, residual in; residual out; bits        12 + 1/8
  sign_decode_add   out in and out; R x bits                  8 + R/8
  sign_server_step  error in and out; R x bits in; bits out   8 + (R+1)/8
  qsgd_encode 4b    x in; sign and level codes out            4 + 5/8
  qsgd_decode_add   out in and out; R x codes                 8 + R*5/8
  topk_ef 1%        x, residual in; residual out               12 (+ payload)
  d2d copy (CUDA)   read 4, write 4                            8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model  # noqa: E402
from lightning_compress_kernels import _dispatch, cpu, qsgd, sign, topk  # noqa: E402

SIZES = {"1M": 1 << 20, "25M": 25 * (1 << 20), "100M": 100 * (1 << 20)}
BLOCK = 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ops(n: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=gen)
    e = torch.randn(n, device=device, generator=gen) * 0.1
    r = torch.empty(n, device=device)
    out = torch.zeros(n, device=device)
    code = sign.sign_ef(x, e, block=BLOCK)
    q = qsgd.qsgd_encode(x, bits=4, block=BLOCK, seed=1)
    k = n // 100
    tk = topk.topk_ef(x, e, k=k, seed=1)
    R = 2
    yield "sign_ef (fused EF + sign + pack)", 12 + 1 / 8, lambda: sign.sign_ef(x, e, block=BLOCK, residual_out=r)
    yield f"sign_decode_add (R={R})", 8 + R / 8, lambda: sign.sign_decode_add(
        [code.scales] * R, [code.packed] * R, out, block=BLOCK
    )
    yield f"sign_server_step (R={R})", 8 + (R + 1) / 8, lambda: sign.sign_server_step(
        [code.scales] * R, [code.packed] * R, e, block=BLOCK, server_error_out=r
    )
    yield "qsgd_encode (4 bits)", 4 + 5 / 8, lambda: qsgd.qsgd_encode(x, bits=4, block=BLOCK, seed=2)
    yield f"qsgd_decode_add (4 bits, R={R})", 8 + R * 5 / 8, lambda: qsgd.qsgd_decode_add(
        [q.norms] * R, [q.signs] * R, [q.codes] * R, out, bits=4, block=BLOCK
    )
    yield "topk_ef (1%, exact k)", 12, lambda: topk.topk_ef(x, e, k=k, residual_out=r, seed=3)
    yield f"scatter_add (1%, R={R})", 16 * R * k / n, lambda: topk.scatter_add(
        [tk.values] * R, [tk.indices] * R, out
    )


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = cpu_model() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.system()} (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M,25M,100M")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--path", default="auto", choices=_dispatch.PATHS)
    parser.add_argument("--twin", action="store_true", help="also time the torch twins (sizes up to 25M)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()

    os.environ[_dispatch.ENV_VAR] = args.path
    probe = torch.zeros(1, device=args.device)
    path = _dispatch.path_for(probe)
    lines = [
        f"# Kernel ops on {args.device}: path `{path}`",
        "",
        f"Machine: {machine(args.device)}.",
        f"Command: `python benchmarks/kernel_ops.py {' '.join(sys.argv[1:])}`; median of {args.repeats} runs"
        " after one warm-up; GB/s counts the bytes each op must move (see the script's doc).",
    ]
    if path == "cpu":
        lines.append(f"CPU library: `{os.path.basename(cpu.library_path())}`.")
    lines += ["", "| n | op | path | ms | GB/s | x add_ |", "|---|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for label in args.sizes.split(","):
        n = SIZES[label]
        y = torch.zeros(n, device=args.device)
        x = torch.randn(n, device=args.device)
        repeats = args.repeats if n <= SIZES["25M"] else max(3, args.repeats // 2)
        base = median_ms(lambda y=y, x=x: y.add_(x), args.device, repeats)
        rows = [(label, "add_ (y += x)", "torch", base, 12 * n / base / 1e6, 1.0)]
        if args.device == "cuda":
            copy = median_ms(lambda y=y, x=x: y.copy_(x), args.device, repeats)
            rows.append((label, "d2d copy", "torch", copy, 8 * n / copy / 1e6, copy / base))
        del x, y
        paths = [path] + (["torch"] if args.twin and path != "torch" and n <= SIZES["25M"] else [])
        for p in paths:
            os.environ[_dispatch.ENV_VAR] = p
            for name, bpe, fn in ops(n, args.device):
                ms = median_ms(fn, args.device, repeats if p != "torch" else 3)
                rows.append((label, name, p, ms, bpe * n / ms / 1e6, ms / base))
        os.environ[_dispatch.ENV_VAR] = args.path
        for row in rows:
            line = "| {} | {} | {} | {:.2f} | {:.1f} | {:.2f} |".format(*row)
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
