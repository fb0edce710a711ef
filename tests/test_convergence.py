"""Compressed training keeps up with dense training per epoch (digits, 2 gloo ranks).

The recommended configurations, with the optimizer's momentum where ``momentum='auto'`` puts
it, must not fall more than 2 points behind dense after 5 epochs, mean over three seeds (one
run's accuracy moves by about a point with the seed on 360 test images). The same training
loop as ``benchmarks/convergence.py``, whose full tables are in ``benchmarks/results``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

from tests._dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
EPOCHS = 5
# The defaults as a user gets them: DoubleSqueeze with 256 elements per scale, top-k with DGC's density
# warm-up over its first 100 steps (without it, top-k 1% + ef with AdamW reached 88.0% after 5 epochs),
# EF21 on top-k 1% with its estimate step of 1.1 (with the paper's 1, SGD reached 91.5% against 95.5%).
CONFIGS = (
    "compressor=sign,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef21",
    "compressor=sign,feedback=doublesqueeze",
)
RECOMMENDED = {"sgd": CONFIGS, "adamw": CONFIGS}


def _worker(rank, world, optimizer):
    pytest.importorskip("sklearn")
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]
    import convergence as bench
    from digits_data import digits

    data = {seed: digits(seed) for seed in SEEDS}

    def mean_acc(label, opt=optimizer):
        return statistics.fmean(
            bench.train("mlp", opt, label, seed, EPOCHS, rank, world, data[seed])["acc"][-1] for seed in SEEDS
        )

    dense = mean_acc(bench.DENSE)
    for label in RECOMMENDED[optimizer]:
        acc = mean_acc(label)
        assert acc >= dense - 0.02, f"{optimizer} {label}: {100 * acc:.1f}% after {EPOCHS} epochs, dense {100 * dense:.1f}%"


@pytest.mark.parametrize("optimizer", sorted(RECOMMENDED))
def test_recommended_configurations_within_two_points_of_dense_after_five_epochs(optimizer):
    run_distributed(_worker, optimizer)


def test_report_gives_the_gap_to_dense_of_another_run(tmp_path):
    """``--dense-from``: a configuration at another learning rate is compared with dense at the user's."""
    import argparse
    import json

    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]
    import convergence as bench

    def run(optimizer, config, acc):
        return {"task": "mlp", "optimizer": optimizer, "config": config, "seed": 0, "acc": acc, "sent": [1e6] * len(acc)}

    flat = [0.9] * 6
    other = tmp_path / "usual_lr.json"
    other.write_text(json.dumps([run("sgd", bench.DENSE, [0.9] * 4 + [0.95, 0.96])]))
    runs = [run("sgd@0.08", bench.DENSE, flat), run("sgd@0.08", "compressor=sign", [0.9] * 4 + [0.93, 0.95])]
    args = argparse.Namespace(tasks=["mlp"], optimizers=["sgd@0.08"], configs=["compressor=sign"], seeds=[0],
                              epochs=6, schedule="constant", dense_from=str(other))  # fmt: skip
    rows = {line.split(" | ")[0]: line for line in bench.report(runs, args).splitlines() if line.startswith("| `")}
    # against dense at lr 0.08 (flat at 90%) it is ahead; against dense at the usual lr 2 points behind (epoch 5)
    assert "| -3.0 | +2.0 |" in rows["| `compressor=sign`"]
    assert "| +0.0 | +6.0 |" in rows["| `dense`"]
