"""What a user sees: the start and end lines, warnings when nothing is exchanged, signatures that tools
read, the metrics each integration logs, the per-tensor view and the plot command.

Multi-process runs use 2 CPU ranks (``fork`` for Lightning and Fabric; the real ``accelerate launch``
for Accelerate); report lines are caught by a file handler the forked ranks inherit.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import logging
import os
import re
import struct
import subprocess
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.distributed as dist
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import lightning_compress  # noqa: E402
from lightning_compress import CompressionConfig, CompressionMonitor, CompressionState, GraVAC, report  # noqa: E402
from lightning_compress.adaptive import attach_gravac, compressor_at  # noqa: E402
from lightning_compress.callbacks import GRAVAC_STRATEGY_HINT  # noqa: E402
from lightning_compress.compressors import COMPRESSORS  # noqa: E402
from lightning_compress.config import (  # noqa: E402
    FEEDBACKS,
    MOMENTUM_MODES,
    TRANSPORTS,
    coarse_two_pass_hint,
    sparse_ef21_hint,
)
from lightning_compress.fabric import CompressedDDPStrategy as FabricStrategy  # noqa: E402
from lightning_compress.strategy import CompressedDDPStrategy  # noqa: E402
from tests._dist import free_port  # noqa: E402
from tests.test_lightning import SMALL, STEPS_PER_EPOCH, Net, _restore_master_port, fit  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 180
# The two lines, in the same form for every integration ("<tool>: ...").
START = r"{tool}: compressing gradients on 2 ranks with {settings}: about ([\d.]+ (?:B|KiB|MiB)) per step per rank " \
        r"against ([\d.]+ (?:B|KiB|MiB)) for dense DDP \(([\d.]+)x fewer\); (\d+) of (\d+) tensors compressed"
END = r"{tool}: (\d+) steps, (\d+) compressed, on 2 ranks with {settings}: sent .+ per rank against .+ for dense " \
      r"DDP \(([\d.]+)x fewer\); mean gain ([\d.]+); exchange [\d.]+ s on the training thread"


@pytest.fixture
def report_lines(tmp_path):
    """The report logger's lines, from this process and from forked ranks (a file they inherit)."""
    path = tmp_path / "report.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    report.report_logger.addHandler(handler)

    def read() -> list[str]:
        handler.flush()
        return path.read_text().splitlines() if path.exists() else []

    yield read
    report.report_logger.removeHandler(handler)
    handler.close()


@pytest.fixture
def no_process_group():
    """In-process one-process runs initialise a process group: end it, or forked ranks would inherit it."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _metrics(root: Path) -> list[dict]:
    (path,) = root.glob("**/metrics.csv")
    return list(csv.DictReader(open(path)))


# ===== 1. Say what runs ===========================================================================
def test_lightning_prints_start_and_end_lines_on_rank_0(tmp_path, report_lines):
    fit(CompressedDDPStrategy(start_method="fork", compressor="topk", density=0.25, **SMALL), tmp_path, epochs=2)
    lines = report_lines()
    settings = re.escape("topk(density=0.25)/ef via allgather (min_numel=16, momentum=auto)")
    starts = [m for m in (re.match(START.format(tool="lightning-compress", settings=settings), x) for x in lines) if m]
    ends = [m for m in (re.match(END.format(tool="lightning-compress", settings=settings), x) for x in lines) if m]
    assert len(starts) == 1 and len(ends) == 1, lines  # rank 0 only, once each
    sent, dense, ratio, compressed, total = starts[0].groups()
    assert (int(compressed), int(total)) == (2, 4) and float(ratio) > 1.5  # two weights; biases go dense
    steps, steps_compressed, ratio_end, gain = ends[0].groups()
    assert int(steps) == int(steps_compressed) == 2 * STEPS_PER_EPOCH
    assert float(ratio_end) > 1.5 and 0.0 < float(gain) <= 1.0
    assert lines.index(starts[0].string) < lines.index(ends[0].string)


def test_start_line_names_the_default_density_warmup_except_under_gravac():
    params = [("w", (64, 64), 4), ("b", (64,), 4)]
    topk = CompressionConfig(compressor="topk", density=0.01)
    line = report.start_line("lightning-compress", topk, params, 2)
    assert "topk(density=0.01)/ef via allgather (min_numel=1024, momentum=auto, density_warmup_steps=100)" in line
    assert "density warm-up: topk keeps 0.25 at first, down to 0.01 after 100 compressed steps" in line
    gravac = report.start_line("lightning-compress", topk, params, 2, gravac_theta_min=10.0)
    assert "density_warmup_steps" not in gravac and "density warm-up" not in gravac and "GraVAC picks" in gravac
    off = report.start_line("lightning-compress", topk.replace(density_warmup_steps=0), params, 2)
    assert "density_warmup_steps" not in off and "density warm-up" not in off


def test_start_line_tells_users_of_two_compressions_about_coarse_blocks():
    params = [("w", (64, 64), 4), ("b", (64,), 4)]
    coarse = CompressionConfig(feedback="doublesqueeze", block_size=1024)
    ds = report.start_line("lightning-compress", coarse, params, 2)
    assert ds.endswith("; " + coarse_two_pass_hint(coarse, "two_pass")) and "set block_size=256" in ds
    assert "sign(block_size=1024)/doublesqueeze" in ds
    default = report.start_line("lightning-compress", CompressionConfig(feedback="doublesqueeze"), params, 2)
    assert "sign(block_size=256)/doublesqueeze" in default and "block_size=256," not in default
    # ef over two passes is DoubleSqueeze's algorithm (4 ranks and more): the same hint; over all_gather none
    assert "set block_size=256" in report.start_line("lightning-compress", CompressionConfig(), params, 4)
    assert "set block_size=256" not in report.start_line("lightning-compress", CompressionConfig(), params, 2)
    assert coarse_two_pass_hint(CompressionConfig(compressor="topk", feedback="doublesqueeze"), "two_pass") is None


def test_start_line_shows_ef21s_step_and_tells_users_of_sparse_ef21_about_its_lag():
    params = [("w", (64, 64), 4), ("b", (64,), 4)]
    sparse = CompressionConfig(compressor="topk", density=0.01, feedback="ef21")
    # By default sparse EF21 takes a larger estimate step with an optimizer's momentum in the exchange: the
    # settings say so, and the hint gives the lag with step 1, the figures behind the default, and `ef`.
    line = report.start_line("lightning-compress", sparse, params, 2)
    assert "topk(density=0.01)/ef21(step=1.1 with an optimizer's momentum in the exchange, else 1) via allgather" in line
    assert line.endswith("; " + sparse_ef21_hint(sparse)) and "feedback=ef stayed within 1 point" in line
    assert "ef21_step=None takes 1.1 with an optimizer's momentum in the exchange (0.7 behind with SGD" in line
    assert sparse_ef21_hint(sparse.replace(compressor="dgc")) is not None
    assert sparse_ef21_hint(sparse.replace(ef21_step=1.0)) is not None  # the paper's step set by hand
    # a step above 1 set by hand: shown, no hint
    line = report.start_line("lightning-compress", sparse.replace(ef21_step=1.3), params, 2)
    assert "/ef21(step=1.3) via" in line and "EF21 holds" not in line
    # ef, a denser top-k, a non-sparsifying compressor, and GraVAC (which picks the density itself): no hint
    for quiet in (sparse.replace(feedback="ef"), sparse.replace(density=0.1), CompressionConfig(feedback="ef21")):
        assert sparse_ef21_hint(quiet) is None
        assert "EF21 holds" not in report.start_line("lightning-compress", quiet, params, 2)
    assert "EF21 holds" not in report.start_line("lightning-compress", sparse, params, 2, gravac_theta_min=10.0)
    assert "/ef21 via" in report.start_line("lightning-compress", CompressionConfig(feedback="ef21"), params, 2)


def _fabric_train(fabric, steps: int, root: str):
    from lightning_compress.report import expected_bytes

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    net = Net()
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    state = fabric.strategy.compression_state
    for step in range(steps):
        i = ((step % 4) * 2 + fabric.global_rank) * 8
        opt.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8]))
        opt.step()
    fabric.logger.finalize("success")
    # The start line's estimate is what a step sends, flags and alignment aside.
    rows = expected_bytes(state.config, [(n, p.shape, 4) for n, p in net.named_parameters()], 2)
    estimate = sum(r.sent_bytes for r in rows)
    measured = state.stats.sent_bytes_last_step
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)
    assert repr(state).startswith("CompressionState(topk/ef via allgather, rank ")


def test_fabric_prints_lines_and_logs_through_log_dict(tmp_path, report_lines):
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger as FabricCSVLogger

    os.environ["MASTER_PORT"] = str(free_port())
    fabric = Fabric(
        strategy=FabricStrategy(start_method="fork", compressor="topk", density=0.25, **SMALL), accelerator="cpu",
        devices=2, loggers=FabricCSVLogger(str(tmp_path), name="csv"),
        callbacks=[CompressionMonitor(layer_every_n_steps=3, layer_table=True)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fabric.launch(_fabric_train, 6, str(tmp_path))
    rows = _metrics(tmp_path)
    logged = [r for r in rows if r.get("compression/ratio")]
    assert [int(r["step"]) for r in logged] == list(range(1, 7))  # one row per optimizer step
    for key in ("compression/bytes_sent", "compression/bytes_sent_total", "compression/dense_bytes", "compression/gain"):
        assert all(r[key] != "" for r in logged), key
    assert all(float(r["compression/ratio"]) > 1.5 for r in logged)
    layered = [r for r in logged if r.get("compression/layer/l1.weight/gain")]  # every 3rd step, in the same row
    assert [int(r["step"]) for r in layered] == [3, 6]
    assert all(float(r["compression/layer/l1.bias/ratio"]) == 1.0 for r in layered)
    lines = report_lines()
    settings = re.escape("topk(density=0.25)/ef via allgather (min_numel=16, momentum=auto)")
    assert sum(bool(re.match(START.format(tool="lightning-compress", settings=settings), x)) for x in lines) == 1
    ends = [m for m in (re.match(END.format(tool="lightning-compress", settings=settings), x) for x in lines) if m]
    assert len(ends) == 1 and ends[0].group(1) == "6", lines  # at the ranks' exit: Fabric has no end of training
    table = "\n".join(lines)  # printed at rank 0's exit too, with the gains of the last measured step
    assert table.count("per-tensor view") == 1 and re.search(r"^l1\.weight\s+32x16\s+compressed .* 0\.\d{3}$", table, re.M)


@pytest.mark.parametrize("feedback,transport", [("ef", "two_pass"), ("doublesqueeze", "two_pass"), ("none", "two_pass"),
                                                ("ef", "allgather")])
def test_expected_bytes_match_the_transports_wire(feedback, transport):
    """The start line's estimate against the wire buffers the transports build (4 ranks, one bucket)."""
    from lightning_compress.transport import TRANSPORTS, Batch, Collectives

    config = CompressionConfig(compressor="sign", feedback=feedback, transport=transport, block_size=64, min_numel=16)
    numels, world = [4096, 1000, 777], 4
    comp = config.make_compressor()
    comm = Collectives(None, world, 0)
    batch = Batch(comp, numels, [torch.zeros(n) for n in numels], lambda t, j: 0, torch.device("cpu"))
    if transport == "two_pass":
        server = [torch.zeros(-(-n // world)) for n in numels] if feedback in ("ef", "doublesqueeze") else None
        t = TRANSPORTS[transport](comm, batch, server_memory=server, server_seed=lambda i, r: 0)
        wire = world * t.row_bytes * (world - 1) / world + t.second_bytes * (world - 1)
    else:
        wire = TRANSPORTS[transport](comm, batch).layout.total * (world - 1)
    rows = report.expected_bytes(config, [(f"w{i}", (n, 1, 1), 4) for i, n in enumerate(numels)], world)
    estimate = sum(r.sent_bytes for r in rows)
    assert abs(estimate - wire) <= 0.04 * wire, (estimate, wire)  # a flag (8 bytes) per row and pass aside


def test_state_repr_says_what_it_holds():
    state = CompressionState(CompressionConfig(compressor="topk", density=0.1), {1: "w", 2: "b"})
    text = repr(state)
    assert "object at 0x" not in text
    assert text.startswith("CompressionState(topk/ef via allgather, rank 0 of 1, step 0, 2 tensors, memory 0 tensors")
    state.memory["w"] = {"residual": torch.zeros(1024)}
    state.stats.steps, state.stats.gain = 3, 0.5
    assert "memory 1 tensors (0.00391 MiB)" in repr(state) and "gain 0.500" in repr(state)


def test_one_process_lightning_run_warns_and_claims_nothing(tmp_path, report_lines, no_process_group):
    from tests.test_lightning import loader

    os.environ["MASTER_PORT"] = str(free_port())
    trainer = pl.Trainer(strategy=CompressedDDPStrategy(**SMALL), accelerator="cpu", devices=1, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.warns(UserWarning, match="runs on 1 process: there is no gradient exchange, so compression saves no"):
        trainer.fit(Net(), loader())
    assert trainer.strategy.compression_state.stats.steps == STEPS_PER_EPOCH * 2  # one rank takes every batch
    assert not [x for x in report_lines() if "compressing gradients" in x or "sent" in x], report_lines()


def test_one_process_fabric_run_warns(tmp_path, report_lines, no_process_group):
    from lightning.fabric import Fabric

    os.environ["MASTER_PORT"] = str(free_port())
    fabric = Fabric(strategy=FabricStrategy(**SMALL), accelerator="cpu", devices=1)
    fabric.launch()
    net = Net()
    with pytest.warns(UserWarning, match="runs on 1 process"):
        fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    fabric.strategy.teardown()
    assert not [x for x in report_lines() if "compressing gradients" in x], report_lines()


def test_enable_warns_on_one_process_and_claims_nothing(monkeypatch, report_lines) -> None:
    from accelerate_compress import enable

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = types.SimpleNamespace(num_processes=1, register_for_checkpointing=None, distributed_type="NO")
    with pytest.warns(UserWarning, match=r"compression \(sign\(block_size=1024\)/ef .*\) is NOT enabled: this run has one"):
        assert enable(accelerator, nn.Linear(64, 64), "compressor=sign") is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"2 processes were started .* train independently.*--cpu"):
        assert enable(accelerator, nn.Linear(64, 64), "compressor=sign") is None
    assert report_lines() == []


def test_launcher_says_requested_and_warns_without_gpus(tmp_path, capsys, monkeypatch) -> None:
    from accelerate_compress import launcher

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                   "mixed_precision: 'no'\ncompression:\n  compressor: sign\n  feedback: doublesqueeze\n")  # fmt: skip
    launched = []
    monkeypatch.setattr(launcher, "_accelerate_launch", lambda argv, env: launched.append((argv, env)) or 0)
    monkeypatch.setattr(launcher, "_gpu_count", lambda: 0)
    assert launcher.main(["launch", "--config_file", str(cfg), "train.py"]) == 0
    err = capsys.readouterr().err
    assert "compression sign/doublesqueeze requested" in err and "compression sign/doublesqueeze (" not in err
    assert "no GPU" in err and "--cpu" in err and "not be compressed" in err
    # With --cpu the processes form a gloo group: no warning.
    assert launcher.main(["launch", "--config_file", str(cfg), "--cpu", "train.py"]) == 0
    assert "no GPU" not in capsys.readouterr().err


def test_ratio_and_gravac_cf_count_different_things(tmp_path):
    """``compression/ratio`` is bytes on the wire; ``gravac/cf`` elements kept: top-k sends an index per value."""
    quick = dict(theta_min=2.0, theta_max=16.0, epsilon=0.2, window=2, scaling="geometric", omega=0.0)
    strategy = CompressedDDPStrategy(start_method="fork", compressor="topk", feedback="ef", **SMALL)
    fit(strategy, tmp_path, epochs=2, callbacks=[GraVAC(**quick)], logger=CSVLogger(str(tmp_path), name="csv"),
        log_every_n_steps=1)  # fmt: skip
    rows = [r for r in _metrics(tmp_path) if r.get("gravac/cf") and r.get("compression/ratio")]
    assert len(rows) == 2 * STEPS_PER_EPOCH
    config = strategy.compression_config
    params = [(n, p.shape, 4) for n, p in Net().named_parameters()]
    for r in rows:
        cf, ratio = float(r["gravac/cf"]), float(r["compression/ratio"])
        assert cf > 1.0 and ratio < cf  # more bytes per kept element than a dense element
        sizes = report.expected_bytes(config, params, 2, compressor_at(config, cf))
        expected = sum(s.dense_bytes for s in sizes) / (sum(s.sent_bytes for s in sizes) + 32)  # + GraVAC's gather
        assert abs(ratio - expected) <= 0.1 * expected, (cf, ratio, expected)
    assert "elements kept" in lightning_compress.callbacks.__doc__ and "bytes on the wire" in GraVAC.__doc__


# ===== 4. GraVAC speaks correctly =================================================================
@pytest.mark.parametrize("compressor", ["topk", "dgc", "qsgd"])
def test_gravac_levels_do_not_warn_the_user(compressor):
    config = CompressionConfig(compressor=compressor, feedback="ef", bits=8)
    state = CompressionState(config, {1: "w"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = attach_gravac(state)
        for cf in (10.0, 20.0, 100.0, 32.0 / 3.0):
            run.compressor(cf)
    assert [str(w.message) for w in caught] == []
    assert compressor_at(config, 20.0).density == (0.05 if compressor != "qsgd" else config.density)


def test_gravac_error_suggests_a_strategy_that_works():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer = types.SimpleNamespace(strategy=CompressedDDPStrategy())  # compressed_ddp's default: sign
    with pytest.raises(MisconfigurationException) as err:
        GraVAC()._strategy_check(trainer)
    assert GRAVAC_STRATEGY_HINT in str(err.value)
    with pytest.raises(MisconfigurationException, match=re.escape(GRAVAC_STRATEGY_HINT)):
        GraVAC()._strategy_check(types.SimpleNamespace(strategy=pl.strategies.DDPStrategy()))
    # The settings GraVAC cannot run with fail here, before training, with the same text the state would raise.
    for settings, needle in (
        (dict(compressor="topk", density_warmup_steps=5), "density warm-up"),
        (dict(compressor="topk", hierarchical=True), "hierarchical=True"),
        (dict(compressor="topk", transport="two_pass"), "two_pass"),
        (dict(compressor="topk", feedback="ef21"), "feedback='ef'"),
    ):
        with pytest.raises(MisconfigurationException, match=re.escape(needle)):
            GraVAC()._strategy_check(types.SimpleNamespace(strategy=CompressedDDPStrategy(**settings)))
    # What the message suggests passes the same check.
    suggested = re.search(r"strategy=(CompressedDDPStrategy\(.*?\))", GRAVAC_STRATEGY_HINT).group(1)
    GraVAC()._strategy_check(types.SimpleNamespace(strategy=eval(suggested)))


# ===== 3. Defaults and parameters that tools can read =============================================
@pytest.mark.parametrize("cls", [CompressedDDPStrategy, FabricStrategy], ids=["trainer", "fabric"])
def test_strategy_signature_shows_real_defaults_and_choices(cls):
    params = inspect.signature(cls, eval_str=True).parameters
    for name, default in CompressionConfig().to_dict().items():
        assert params[name].default == default, name
    assert set(get_args(params["compressor"].annotation)) == set(COMPRESSORS)
    assert get_args(params["feedback"].annotation) == FEEDBACKS
    assert get_args(params["transport"].annotation) == TRANSPORTS
    assert get_args(params["momentum"].annotation) == MOMENTUM_MODES
    assert not {"ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"} & set(params)


def test_trainer_and_fabric_strategies_take_the_same_compression_options():
    """The two constructors spell their options out (tools read signatures, not code) and hand them to one
    shared body (``_CompressionCore._init_compression``): the lists must not drift apart or from the config."""
    fields = list(CompressionConfig().to_dict())
    hints = typing.get_type_hints(CompressionConfig)
    trainer, fabric = (inspect.signature(c, eval_str=True).parameters for c in (CompressedDDPStrategy, FabricStrategy))
    for params in (trainer, fabric):
        assert [n for n in params if n in fields] == fields  # every field, in the config's order
        for name in fields:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            if not get_args(params[name].annotation):  # the choices (Literal) are checked above
                assert params[name].annotation == hints[name], name
    for name in (*fields, "compression", "save_compression_memory"):
        assert (trainer[name].annotation, trainer[name].default) == (fabric[name].annotation, fabric[name].default), name


def test_keywords_override_a_base_config_when_off_their_default():
    assert CompressedDDPStrategy("compressor=topk,density=0.1").compression_config.compressor == "topk"
    cfg = CompressedDDPStrategy("compressor=topk,density=0.1", density=0.2, feedback="ef21").compression_config
    assert (cfg.compressor, cfg.density, cfg.feedback) == ("topk", 0.2, "ef21")
    assert CompressedDDPStrategy(static_graph=True)._ddp_kwargs == {"static_graph": True}
    assert CompressedDDPStrategy()._ddp_kwargs == {}


def test_gravac_names_its_parameters():
    params = inspect.signature(GraVAC).parameters
    for name in ("theta_min", "theta_max", "epsilon", "omega", "window", "scaling", "ewma", "prefix", "prog_bar"):
        assert name in params, name
    assert not {"world_size", "ladder"} & set(params)
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert (params["epsilon"].default, params["omega"].default, params["scaling"].default) == (0.7, 0.01, "exponential")
    cb = GraVAC(window=7, epsilon=0.3)
    assert cb.controller_kwargs == {"epsilon": 0.3, "omega": 0.01, "window": 7, "scaling": "exponential"}


@pytest.mark.parametrize("path", ["lightning_compress.CompressedDDPStrategy", "lightning_compress.strategy.CompressedDDPStrategy"])
def test_class_path_resolves_as_a_strategy_name(path):
    trainer = pl.Trainer(strategy=path, accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is CompressedDDPStrategy
    from lightning.fabric import Fabric

    assert isinstance(Fabric(strategy="lightning_compress.fabric.CompressedDDPStrategy", accelerator="cpu",
                             devices=2).strategy, FabricStrategy)  # fmt: skip


def test_lightning_cli_class_path_with_and_without_init_args(tmp_path):
    pytest.importorskip("jsonargparse")
    script = tmp_path / "cli.py"
    script.write_text(
        "import sys, lightning_compress\n"
        "from lightning.pytorch.cli import LightningCLI\n"
        "from lightning.pytorch.demos.boring_classes import BoringModel, BoringDataModule\n"
        "cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=sys.argv[1:])\n"
        "s = cli.trainer.strategy\n"
        "print('RESULT', type(s).__name__, s.compression_config.compressor, s.compression_config.density, s._ddp_kwargs)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, str(script), "--trainer.strategy=lightning_compress.CompressedDDPStrategy",
            "--trainer.accelerator=cpu", "--trainer.devices=2"]  # fmt: skip
    for extra, expected in (([], "RESULT CompressedDDPStrategy sign 0.01 {}"),
                            (["--trainer.strategy.compressor=topk", "--trainer.strategy.static_graph=true"],
                             "RESULT CompressedDDPStrategy topk 0.01 {'static_graph': True}")):  # fmt: skip
        out = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert expected in out.stdout, out.stdout + out.stderr[-3000:]
    # The full class form (with every init argument and its default) is printed once one init argument is given.
    out = subprocess.run(base + ["--trainer.strategy.static_graph=false", "--print_config"], env=env,
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)  # fmt: skip
    assert "compressor: sign" in out.stdout and "min_numel: 1024" in out.stdout, out.stderr[-3000:]
    assert "ddp_comm_hook" not in out.stdout and "model_averaging_period" not in out.stdout


def test_launcher_has_an_option_for_every_field():
    from accelerate_compress.launcher import _accelerate_parser, plan

    options = {a for action in _accelerate_parser()._actions for a in action.option_strings}
    # what a user types: argparse %-formats every help string
    out = subprocess.run([sys.executable, "-m", "accelerate_compress.launcher", "launch", "--help"],
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in CompressionConfig().to_dict():
        assert f"--{name}" in options, name
        assert f"--{name}" in out.stdout, name
    assert "keep 25%," in out.stdout and "256 with doublesqueeze" in out.stdout
    argv = ["--cpu", "--num_processes", "2", "--compressor", "dgc", "--density", "0.1", "--feedback", "ef21",
            "--transport", "allgather", "--warmup_steps", "3", "--min_numel", "10", "--block_size", "64",
            "--seed", "7", "--dgc_sample_fraction", "0.5", "--momentum", "optimizer", "--bits", "4",
            "--diana_alpha", "none", "train.py"]  # fmt: skip
    config = plan(argv, environ={})["config"]
    assert config == CompressionConfig(compressor="dgc", density=0.1, feedback="ef21", transport="allgather",
                                       warmup_steps=3, min_numel=10, block_size=64, seed=7, dgc_sample_fraction=0.5,
                                       momentum="optimizer", bits=4)  # fmt: skip
    with pytest.raises(ValueError, match="--warmup_steps must be an integer"):
        plan(["--warmup_steps", "x", "train.py"], environ={})
    # 'none' means the default block size, which DoubleSqueeze makes finer
    ds = plan(["--feedback", "doublesqueeze", "--block_size", "none", "train.py"], environ={})["config"]
    assert ds.block_size is None and ds.block_size_resolved == 256
    # ... and the default density warm-up: 100 steps for top-k at 1%, or off with 0
    for value, steps in (("none", 100), ("0", 0), ("40", 40)):
        topk = plan(["--compressor", "topk", "--density_warmup_steps", value, "train.py"], environ={})["config"]
        assert topk.density_warmup_steps_resolved == steps


def test_compression_monitor_is_exported():
    from lightning_compress.callbacks import CompressionMonitor as Defined

    assert CompressionMonitor is Defined and "CompressionMonitor" in lightning_compress.__all__
    assert CompressionMonitor.__doc__ and "fabric.log_dict" in CompressionMonitor.__doc__


# ===== 2. Show what it buys =======================================================================
def test_layer_rows_bytes_dense_reasons_and_gain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 4))
    config = CompressionConfig(compressor="topk", density=0.25, min_numel=200)
    state = CompressionState(config, {id(p): n for n, p in model.named_parameters()},
                             param_shapes={n: p.shape for n, p in model.named_parameters()})  # fmt: skip
    model(torch.randn(8, 64)).square().sum().backward()
    rows = {r.name: r for r in report.layer_rows(state, model.named_parameters())}
    assert rows["0.weight"].sent_as == "compressed" and rows["0.bias"].sent_as == "dense (1-D)"
    assert rows["1.weight"].sent_as == "dense (< min_numel=200)"  # 128 elements
    assert rows["0.weight"].sent_bytes == 0.0  # one process sends nothing
    assert 0.25 < rows["0.weight"].gain < 1.0 and rows["0.bias"].gain is None
    table = report.layer_table(list(rows.values()))
    assert table.splitlines()[2].startswith("0.weight") and "dense (1-D)" in table
    metrics = report.layer_metrics(list(rows.values()))
    assert set(metrics) >= {"compression/layer/0.weight/gain", "compression/layer/0.bias/ratio"}
    assert "compression/layer/0.bias/gain" not in metrics


def test_lightning_per_tensor_metrics_every_n_steps_and_table(tmp_path, report_lines):
    monitor = CompressionMonitor(layer_every_n_steps=2, layer_table=True)
    fit(CompressedDDPStrategy(start_method="fork", compressor="topk", density=0.25, **SMALL), tmp_path, epochs=1,
        callbacks=[monitor], logger=CSVLogger(str(tmp_path), name="csv"), log_every_n_steps=1)  # fmt: skip
    rows = _metrics(tmp_path)
    with_layers = [r for r in rows if r.get("compression/layer/l1.weight/gain")]
    assert [int(r["step"]) for r in with_layers] == [1, 3]  # global steps 2 and 4 (logged 0-based)
    for r in with_layers:
        assert 0.0 < float(r["compression/layer/l1.weight/gain"]) <= 1.0
        assert float(r["compression/layer/l1.weight/ratio"]) > 1.0
        assert float(r["compression/layer/l1.bias/ratio"]) == 1.0  # sent densely
    from lightning_compress import plot  # the plot command reads this run's own metrics.csv

    series = plot.read_logs(tmp_path / "csv")
    assert [step for step, _ in series["compression/ratio"]] == [0, 1, 2, 3]
    assert [step for step, _ in series["compression/layer/l1.weight/gain"]] == [1, 3]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.main([str(tmp_path / "csv"), "-o", str(tmp_path / "run.png")]) == 0
        assert (tmp_path / "run.png").stat().st_size > 1000
    table = "\n".join(report_lines())
    assert "per-tensor view" in table
    assert re.search(r"^l1\.weight\s+32x16\s+compressed", table, re.M) and re.search(r"^l1\.bias\s+32\s+dense \(1-D\)", table, re.M)


# A plain Accelerate loop with a tracker of its own (JSON lines), so no tracker package is needed.
ACCELERATE_TRAIN = """
import json, os, sys
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class Lines(GeneralTracker):
    name, requires_logging_directory, main_process_only = "lines", False, True
    def __init__(self, path):
        super().__init__(); self.path = path
    @property
    def tracker(self):
        return self
    def store_init_configuration(self, values):
        pass
    def log(self, values, step=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\\n")

torch.set_num_threads(1)
accelerator = Accelerator(log_with=[Lines(sys.argv[1])])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
model, opt, loader = accelerator.prepare(model, opt, DataLoader(TensorDataset(x, y), batch_size=32))
import accelerate_compress  # the launcher enabled compression; this adds the per-tensor view
accelerate_compress.enable(accelerator, model, log_layers_every_n_steps=2, layer_table=True)
accelerator.init_trackers("run")
for xb, yb in loader:
    loss = nn.functional.cross_entropy(model(xb), yb)
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
accelerator.end_training()
"""


def test_accelerate_lines_and_metrics_through_accelerator_log(tmp_path):
    script, lines = tmp_path / "train.py", tmp_path / "metrics.jsonl"
    script.write_text(ACCELERATE_TRAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(ROOT))  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate_compress.launcher", "launch", "--cpu", "--num_processes", "2",
           "--main_process_port", env["MASTER_PORT"], "--compressor", "topk", "--density", "0.1",
           "--density_warmup_steps", "0", str(script), str(lines)]  # fmt: skip (0: all 4 steps at 10%)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    settings = re.escape("topk(density=0.1)/ef via allgather (min_numel=1024, momentum=auto)")
    err = proc.stderr.splitlines()
    starts = [m for m in (re.match(START.format(tool="accelerate-compress", settings=settings), x) for x in err) if m]
    ends = [m for m in (re.match(END.format(tool="accelerate-compress", settings=settings), x) for x in err) if m]
    assert len(starts) == 1 and len(ends) == 1, proc.stderr[-4000:]
    assert starts[0].group(4, 5) == ("2", "4") and ends[0].group(1, 2) == ("4", "4")  # 128 samples per rank / 32
    logged = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # rank 0 only, once per optimizer step
    for r in logged:
        assert r["compression/ratio"] > 2.0 and 0.0 < r["compression/gain"] <= 1.0
        assert r["compression/bytes_sent"] < r["compression/dense_bytes"]
    assert [r["step"] for r in logged if "compression/layer/0.weight/gain" in r] == [2, 4]
    assert all(r["compression/layer/0.bias/ratio"] == 1.0 for r in logged if "compression/layer/0.bias/ratio" in r)
    assert "accelerate-compress: per-tensor view" in proc.stderr
    assert re.search(r"^0\.weight\s+256x64\s+compressed .* 0\.\d{3}$", proc.stderr, re.M), proc.stderr[-3000:]
    assert re.search(r"^0\.bias\s+256\s+dense \(1-D\)", proc.stderr, re.M)


# ----- the plot command ---------------------------------------------------------------------------
def _event_file(path: Path, scalars: list[tuple[int, str, float]]) -> None:
    """A TensorBoard event file as its writers lay it out (TFRecords of Event protos with simple_value)."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    def field(number: int, kind: int, payload: bytes) -> bytes:
        key = varint(number << 3 | kind)
        return key + (varint(len(payload)) + payload if kind == 2 else payload)

    with open(path, "wb") as f:
        for step, tag, value in scalars:
            summary_value = field(1, 2, tag.encode()) + field(2, 5, struct.pack("<f", value))
            event = field(1, 1, struct.pack("<d", 1.0)) + field(2, 0, varint(step)) + field(5, 2, field(1, 2, summary_value))
            f.write(struct.pack("<Q", len(event)) + b"\0" * 4 + event + b"\0" * 4)  # CRCs are not checked


def test_plot_reads_csv_and_event_files_and_writes_a_png(tmp_path):
    from lightning_compress import plot

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,compression/ratio,compression/bytes_sent,compression/gain,gravac/cf,loss\n"
                        "0,9.5,100,0.6,20,1.0\n1,,,,,0.9\n1,9.7,98,0.62,20,\n")  # fmt: skip
    series = plot.read_logs(csv_path)
    assert series["compression/ratio"] == [(0, 9.5), (1, 9.7)] and series["gravac/cf"] == [(0, 20.0), (1, 20.0)]
    _event_file(tmp_path / "events.out.tfevents.1.host", [(1, "compression/ratio", 4.0), (2, "compression/gain", 0.5)])
    events = plot.read_events(tmp_path / "events.out.tfevents.1.host")
    assert events == {"compression/ratio": [(1, 4.0)], "compression/gain": [(2, 0.5)]}
    both = plot.read_logs(tmp_path)  # a folder: every CSV and event file under it
    assert (1, 4.0) in both["compression/ratio"] and (0, 9.5) in both["compression/ratio"]
    with pytest.raises(ValueError, match="no compression metrics"):
        plot.plot({"loss": [(0, 1.0)]}, tmp_path / "x.png")
    pytest.importorskip("matplotlib")
    assert plot.main([str(csv_path), "-o", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(tmp_path / "missing"), "-o", str(tmp_path / "y.png")]) == 2
