"""GraVAC on the digits example: accuracy and total bytes against dense DDP, CF and gain over steps.

Trains the Lightning digits example (2 CPU ranks, fork) densely and with top-k + EF under the
GraVAC callback, for each seed, and writes a markdown table and a plot of the CF sent and the
gains at ``theta_min`` and at the candidate, step by step (first seed)::

    python benchmarks/gravac_digits.py [--gravac "theta_min=20,epsilon=0.3,window=20"] [--seeds 0,1,2]
        [--epochs 20] [--out benchmarks/results/gravac_digits]

Needs matplotlib for the plot (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository's own package first (over an installed one), and the examples.
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import lightning_digits as ex  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from _machine import free_port  # noqa: E402
from lightning_compress import CompressedDDPStrategy, GraVAC  # noqa: E402

KEYS = ("gravac/cf", "gravac/gain_min", "gravac/gain_candidate", "gravac/candidate_cf", "gravac/theta_min")


def run(seed: int, epochs: int, gravac: dict | None, log_dir: str) -> tuple[dict, list[dict]]:
    os.environ["MASTER_PORT"] = str(free_port())
    if gravac is None:
        return ex.train("ddp_fork", epochs=epochs, seed=seed), []
    strategy = CompressedDDPStrategy(start_method="fork", compressor="topk", feedback="ef")
    result = ex.train(strategy, epochs=epochs, seed=seed, callbacks=[GraVAC(**gravac)],
                      logger=CSVLogger(log_dir, name="gravac"))  # fmt: skip
    (path,) = Path(log_dir, "gravac").glob("version_*/metrics.csv")
    rows = [{k: float(r[k]) for k in KEYS} | {"step": int(r["step"])} for r in csv.DictReader(open(path))
            if r.get("gravac/cf")]  # fmt: skip
    return result, rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.step(steps, [r["gravac/cf"] for r in rows], where="post", label="CF sent (1 = dense)")
    top.plot(steps, [r["gravac/candidate_cf"] for r in rows], "--", label="candidate CF")
    top.plot(steps, [r["gravac/theta_min"] for r in rows], ":", label="theta_min")
    top.set_yscale("log")
    top.set_ylabel("compression factor")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(steps, [r["gravac/gain_min"] for r in rows], label="gain at theta_min")
    bottom.plot(steps, [r["gravac/gain_candidate"] for r in rows], label="gain at the candidate")
    bottom.set_ylabel("compression gain")
    bottom.set_xlabel("optimizer step")
    bottom.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gravac", default="theta_min=20,epsilon=0.3,window=20")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gravac_digits")
    args = parser.parse_args()
    params = ex.gravac_options(args.gravac)
    seeds = [int(s) for s in args.seeds.split(",")]
    table, traces = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            dense, _ = run(seed, args.epochs, None, tmp)
            adaptive, rows = run(seed, args.epochs, params, os.path.join(tmp, str(seed)))
            traces[seed] = rows
            table.append((seed, dense, adaptive, rows))
            print(f"seed {seed}: dense {100 * dense['accuracy']:.2f}%  gravac {100 * adaptive['accuracy']:.2f}% "
                  f"bytes {adaptive['dense_bytes_total'] / adaptive['bytes_total']:.1f}x fewer", flush=True)
    lines = [
        "# GraVAC on digits (top-k + EF, Lightning, 2 CPU ranks on loopback)",
        "",
        f"Command: `python benchmarks/gravac_digits.py --gravac \"{args.gravac}\" --seeds {args.seeds} "
        f"--epochs {args.epochs}`; {platform.machine()} {platform.system()}, {os.cpu_count()} cores.",
        f"GraVAC parameters: {params} (others: the paper's defaults). Bytes are what rank 0 sent over the "
        "whole run, the 32-byte gain exchange per step included; dense is a ring allreduce of every gradient.",
        "",
        "| seed | dense accuracy | GraVAC accuracy | dense MB sent | GraVAC MB sent | fewer bytes | steps at each CF |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for seed, dense, adaptive, rows in table:
        counts: dict[float, int] = {}
        for r in rows:
            counts[r["gravac/cf"]] = counts.get(r["gravac/cf"], 0) + 1
        spread = ", ".join(f"{'dense' if cf == 1 else f'CF {cf:g}'}: {n}" for cf, n in sorted(counts.items()))
        lines.append(
            f"| {seed} | {100 * dense['accuracy']:.2f}% | {100 * adaptive['accuracy']:.2f}% | "
            f"{dense['dense_bytes_total'] / 1e6:.1f} | {adaptive['bytes_total'] / 1e6:.2f} | "
            f"{adaptive['dense_bytes_total'] / adaptive['bytes_total']:.1f}x | {spread} |"
        )
    mean = lambda key, group: sum(row[group][key] for row in table) / len(table)  # noqa: E731
    dense_acc, gravac_acc = mean("accuracy", 1), mean("accuracy", 2)
    ratio = sum(r[2]["dense_bytes_total"] for r in table) / sum(r[2]["bytes_total"] for r in table)
    lines += ["", f"Mean over seeds: dense {100 * dense_acc:.2f}%, GraVAC {100 * gravac_acc:.2f}% "
              f"({100 * (gravac_acc - dense_acc):+.2f} points), {ratio:.1f}x fewer bytes in total.", "",
              f"![CF and gain over steps]({args.out.name}.png)", ""]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    plot(traces[seeds[0]], f"GraVAC {params}, seed {seeds[0]}", args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
