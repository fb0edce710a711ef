"""The GraVAC callback in a Lightning Trainer on 2 CPU ranks: errors, logging, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.multiprocessing import ProcessRaisedException  # noqa: E402

from lightning_compress import GraVAC  # noqa: E402
from lightning_compress.strategy import CHECKPOINT_KEY, CompressedDDPStrategy  # noqa: E402
from tests.test_lightning import SMALL, every, fit, flat, load  # noqa: E402

# A schedule short enough for 8-16 steps: candidate doubles every 2 steps; omega 0 keeps timing
# noise from promoting or settling, so the schedule depends on the gains only.
QUICK = dict(theta_min=2.0, theta_max=16.0, epsilon=0.2, window=2, scaling="geometric", omega=0.0)


def _strategy(**options):
    return CompressedDDPStrategy(start_method="fork", compressor="topk", feedback="ef", **SMALL, **options)


# Forked ranks run the callback's setup: the error reaches the parent wrapped by torch.multiprocessing.
REFUSED = (MisconfigurationException, ProcessRaisedException)


def test_other_strategies_are_refused(tmp_path):
    with pytest.raises(REFUSED, match="MisconfigurationException: GraVAC adapts the compression"):
        fit("ddp_fork", tmp_path, epochs=1, callbacks=[GraVAC(**QUICK)])
    refused = "MisconfigurationException: GraVAC keeps its own error feedback.* use feedback='ef', not 'ef21'"
    with pytest.raises(REFUSED, match=refused):
        fit(CompressedDDPStrategy(start_method="fork", compressor="topk", feedback="ef21", **SMALL), tmp_path,
            epochs=1, callbacks=[GraVAC(**QUICK)])  # fmt: skip


def test_bad_parameters_raise_at_construction():
    with pytest.raises(ValueError):
        GraVAC(epsilon=1.5)


def test_logs_cf_gain_throughput(tmp_path):
    cb = GraVAC(**QUICK)
    fit(_strategy(), tmp_path, epochs=2, callbacks=[cb], logger=CSVLogger(str(tmp_path), name="csv"),
        log_every_n_steps=1)  # fmt: skip
    (path,) = Path(tmp_path, "csv").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(open(path)) if r.get("gravac/cf")]
    assert len(rows) == 8  # one per optimizer step (2 epochs x 4)
    for key in ("gravac/gain", "gravac/gain_min", "gravac/gain_candidate", "gravac/theta_min",
                "gravac/candidate_cf", "gravac/throughput"):  # fmt: skip
        assert all(r[key] != "" for r in rows), key
    cfs = [float(r["gravac/cf"]) for r in rows]
    assert cfs[0] == QUICK["theta_min"] and max(float(r["gravac/candidate_cf"]) for r in rows) > 4.0
    assert all(float(r["gravac/throughput"]) > 0 for r in rows)


def _controller(path: Path) -> dict:
    (state,) = [v for k, v in load(path)["callbacks"].items() if k.startswith("GraVAC")]
    return state["controller"]


def test_resume_continues_the_schedule(tmp_path):
    a = flat(fit(_strategy(), tmp_path / "a", epochs=4, callbacks=[GraVAC(**QUICK), every(4, tmp_path / "ck")]))
    mid = tmp_path / "ck" / "step=8.ckpt"
    assert _controller(mid)["steps"] == 8
    assert all(sd["adaptive"]["steps"] == 8 for sd in load(mid)[CHECKPOINT_KEY]["ranks"])
    b = flat(fit(_strategy(), tmp_path / "b", epochs=4, ckpt_path=str(mid),
                 callbacks=[GraVAC(**QUICK), every(4, tmp_path / "ck_b")]))  # fmt: skip
    end_a, end_b = _controller(tmp_path / "ck" / "step=16.ckpt"), _controller(tmp_path / "ck_b" / "step=16.ckpt")
    assert end_a["steps"] == end_b["steps"] == 16
    schedule = {k: v for k, v in end_a.items() if "throughput" not in k}  # throughputs hold wall-clock times
    assert schedule == {k: v for k, v in end_b.items() if "throughput" not in k}
    assert a.equal(b)  # the same weights: every step sent the same CF with the same residual
