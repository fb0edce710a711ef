"""Wall-clock time to a target test accuracy on a throttled link: dense DDP, PyTorch's hooks, ours.

Trains a 5.41M-parameter MLP (64-2560-2048-10) on digits with 2 gloo ranks inside a network
namespace whose loopback is throttled with ``tc tbf`` (the shared-loopback mode of
``network.py``), SGD lr 0.05 momentum 0.9, batch 32 per rank, until the test accuracy reaches
the target; the clock counts training steps only (the accuracy checks are not counted). Our
configurations move the SGD momentum into the exchange (``attach_optimizer``, as the
strategies do); PyTorch's hooks leave it in the optimizer.

    python benchmarks/time_to_accuracy.py [--bandwidth 1gbit] [--target 0.95] [--seeds 0,1,2]
        [--configs "dense;fp16;powersgd_r2_sync;compressor=sign,feedback=ef;..."]
        [--out benchmarks/results/time_to_accuracy]

Writes ``<out>.md`` (median time to target per configuration and the speedups), ``<out>.json``
and, with matplotlib, ``<out>.png`` (test accuracy against training seconds, first seed).
Needs root for the namespace; without it the run says so and measures on the host loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import network as net  # noqa: E402  (this folder: the namespaces and the rank runner)
from _machine import cpu_model  # noqa: E402

CONFIGS = (
    "dense",
    "fp16",
    "powersgd_r2_sync",
    "compressor=sign,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=sign,feedback=doublesqueeze",
)
BEST_GOAL_VS_DENSE, BEST_GOAL_VS_FP16 = 5.0, 2.0


def run(args) -> dict:
    reason = net.netns_capability()
    nets = net.Namespaces() if reason is None else None
    logdir = Path(tempfile.mkdtemp(prefix="lcbench_tta_"))
    results: dict = {"seeds": {}, "bandwidth": args.bandwidth, "throttled": reason is None, "why_not": reason}
    try:
        for seed in args.seeds:
            topo = nets.shared(f"tta{seed}", net.parse_rate(args.bandwidth), 2) if nets else net.host_topology(2)
            runner = net.Runner(args, nets, logdir / f"seed{seed}")
            worker_args = ["--mode", "tta", "--seed", str(seed), "--target", str(args.target), "--epochs",
                           str(args.epochs), "--eval-every", str(args.eval_every), "--timeout", "600"]  # fmt: skip
            done = runner.run(topo, 2, args.configs, worker_args, timeout=args.timeout)
            seed_rows = {}
            for cfg, (recs, error) in done.items():
                rec = (recs[0] or {}).get("tta") if recs else None
                seed_rows[cfg] = {"error": error or (rec or {}).get("error", "no record")} if error or not rec or "error" in rec else rec
                r = seed_rows[cfg]
                state = "error: " + r["error"][:80] if "error" in r else (
                    f"{r['seconds']:.1f} s, {r['steps']} steps" + ("" if r["reached"] else " (target not reached)"))
                print(f"  seed {seed} {cfg}: {state}", flush=True)
            results["seeds"][str(seed)] = seed_rows
            if nets:
                nets.remove([ns for ns in set(topo.namespaces) if ns])
    finally:
        if nets:
            nets.cleanup()
    return results


def report(results: dict, args) -> str:
    seeds = list(results["seeds"])
    rows = {}
    for cfg in args.configs:
        recs = [results["seeds"][s].get(cfg, {"error": "not run"}) for s in seeds]
        ok = [r for r in recs if "error" not in r and r["reached"]]
        rows[cfg] = {
            "median_s": statistics.median(r["seconds"] for r in ok) if len(ok) == len(recs) else None,
            "steps": statistics.median(r["steps"] for r in ok) if ok else None,
            "per_seed": [None if "error" in r or not r["reached"] else r["seconds"] for r in recs],
            "errors": [r["error"] for r in recs if "error" in r],
        }
    dense = rows.get("dense", {}).get("median_s")
    fp16 = rows.get("fp16", {}).get("median_s")
    where = f"throttled shared loopback, tbf {args.bandwidth}" if results["throttled"] else (
        f"host loopback, unthrottled ({results['why_not']})")
    lines = [
        "# Time to accuracy on a throttled link",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()}; 2 gloo ranks, 1 thread each, {where}.",
        f"Command: `python benchmarks/time_to_accuracy.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Digits, MLP 64-2560-2048-10 (5.41M parameters), SGD lr 0.05 momentum 0.9, batch 32 per rank; training "
        f"seconds until the test accuracy (checked every {args.eval_every} steps) reaches {100 * args.target:.0f}%; "
        f"median over seeds {', '.join(seeds)}.",
        "",
        "| configuration | seconds to target | steps | per seed (s) | x faster than dense | x faster than fp16 hook |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for cfg, r in rows.items():
        t = r["median_s"]
        per = ", ".join("-" if v is None else f"{v:.1f}" for v in r["per_seed"])
        vs_dense = f"{dense / t:.1f}" if t and dense else "-"
        vs_fp16 = f"{fp16 / t:.1f}" if t and fp16 else "-"
        cell = f"{t:.1f}" if t else "not reached" + (f" ({r['errors'][0][:60]})" if r["errors"] else "")
        steps = f"{r['steps']:.0f}" if r["steps"] else "-"
        lines.append(f"| `{cfg}` | {cell} | {steps} | {per} | {vs_dense} | {vs_fp16} |")
    ours = {c: r for c, r in rows.items() if "compressor=" in c and r["median_s"]}
    if ours and dense and fp16:
        best = min(ours, key=lambda c: ours[c]["median_s"])
        t = ours[best]["median_s"]
        lines += [
            "",
            f"Best of ours: `{best}`, {t:.1f} s: {dense / t:.1f}x sooner than dense DDP (goal >= {BEST_GOAL_VS_DENSE:g}x: "
            f"{'met' if dense / t >= BEST_GOAL_VS_DENSE else 'not met'}), {fp16 / t:.1f}x sooner than the fp16 hook "
            f"(goal >= {BEST_GOAL_VS_FP16:g}x: {'met' if fp16 / t >= BEST_GOAL_VS_FP16 else 'not met'}).",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results["seeds"][next(iter(results["seeds"]))]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cfg in args.configs:
        rec = first.get(cfg, {})
        if "curve" not in rec:
            continue
        _, secs, acc = zip(*rec["curve"])
        ax.plot(secs, [100 * a for a in acc], marker=".", label=cfg.replace("compressor=", "").replace("feedback=", ""))
    ax.axhline(100 * args.target, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"training seconds (log), {args.bandwidth}")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(40, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bandwidth", default="1gbit")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=15, help="give up after this many epochs")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--configs", default=";".join(CONFIGS))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a configuration may go without progress")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "time_to_accuracy"))
    p.add_argument("--from-json", action="store_true")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.configs = [c for c in args.configs.split(";") if c]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(out.with_suffix(".json").read_text())
    else:
        results = run(args)
        out.with_suffix(".json").write_text(json.dumps(results))
    out.with_suffix(".md").write_text(report(results, args))
    try:
        plot(results, args, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
