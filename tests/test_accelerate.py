"""Accelerate adapter: the compression flag (YAML, environment, launcher options), enable(), resume.

Multi-process tests start 2 CPU processes (gloo) through the real ``accelerate launch``, either via
``python -m accelerate_compress.launcher launch`` or plain ``python -m accelerate.commands.launch``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from accelerate_compress import enable
from accelerate_compress.flag import (
    ENV_VAR,
    adaptive_from_env,
    adaptive_options,
    config_from_env,
    parse_setting,
    resolve,
    to_inline,
)
from accelerate_compress.launcher import plan
from lightning_compress import CompressionConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_digits.py"
LAUNCH_TIMEOUT = 120

# A plain Accelerate loop: deterministic data (no shuffle), one epoch of 16 batches per rank.
# Only --enable mentions compression (the form for plain `accelerate launch` + ACCELERATE_COMPRESSION).
TRAIN = """
import argparse, hashlib, json, os
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

p = argparse.ArgumentParser()
p.add_argument("--accum", type=int, default=1)
p.add_argument("--save-at", type=int, default=0)
p.add_argument("--save-dir", default=None)
p.add_argument("--resume-dir", default=None)
p.add_argument("--start", type=int, default=0)
p.add_argument("--enable", action="store_true")
p.add_argument("--out", required=True)
args = p.parse_args()
torch.set_num_threads(1)

accelerator = Accelerator(gradient_accumulation_steps=args.accum)
from sklearn.datasets import load_digits
x, y = load_digits(return_X_y=True)
data = TensorDataset(torch.tensor(x[:1024] / 16.0, dtype=torch.float32), torch.tensor(y[:1024]))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=32, shuffle=False))
if args.enable:
    import accelerate_compress
    from lightning_compress.hook import get_compression_state
    state = accelerate_compress.enable(accelerator, model)
    assert state is not None and accelerate_compress.enable(accelerator, model) is state
    assert get_compression_state(model) is state
    assert len(accelerator._custom_objects) == 1, accelerator._custom_objects
if args.resume_dir:
    accelerator.load_state(args.resume_dir)
    loader = accelerator.skip_first_batches(loader, args.start)
batches = args.start
for xb, yb in loader:
    with accelerator.accumulate(model):
        loss = nn.functional.cross_entropy(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    batches += 1
    if batches == args.save_at:
        accelerator.save_state(args.save_dir)
flat = torch.cat([q.detach().reshape(-1) for q in accelerator.unwrap_model(model).parameters()])
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w") as f:
    json.dump({"sha": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "batches": batches,
               "world": accelerator.num_processes, "custom": len(accelerator._custom_objects)}, f)
accelerator.end_training()  # ends the process group: a gloo group left to interpreter teardown can abort the exit
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "ACCELERATE_COMPRESSION_STATS")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate_compress.launcher", "launch", *args]


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _expected_ratio(config: CompressionConfig) -> float:
    """Dense ring-allreduce bytes over compressed bytes for the 64-256-256-10 MLP on 2 ranks."""
    comp = config.make_compressor()
    weights, biases = (64 * 256, 256 * 256, 256 * 10), 256 + 256 + 10
    dense = 4 * (sum(weights) + biases)  # 2(n-1)/n = 1 for n = 2
    return dense / (sum(comp.payload_nbytes(n) for n in weights) + 4 * biases)


@pytest.fixture
def train_script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


# ----- the flag, in process ----------------------------------------------------------------------
def test_flag_forms_agree(tmp_path: Path) -> None:
    inline = "compressor=sign,feedback=doublesqueeze"
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yml"
    nested.write_text("compression:\n  compressor: sign\n  feedback: doublesqueeze\n  adaptive: none\n")
    flat.write_text("compressor: sign\nfeedback: doublesqueeze\n")
    want = CompressionConfig.from_string(inline)
    for text in (inline, str(nested), str(flat), inline + ",adaptive=none"):
        assert resolve(parse_setting(text)) == want
        assert config_from_env({ENV_VAR: text}) == want
    assert config_from_env({}) is None and config_from_env({ENV_VAR: " "}) is None
    full = CompressionConfig(compressor="qsgd", bits=4, block_size=128, feedback="diana", diana_alpha=0.25)
    assert resolve(parse_setting(to_inline(full))) == full


@pytest.mark.parametrize(
    "text, match",
    [
        ("compressor=sgn", r"`compressor` must be one of .*'sign'.*got 'sgn'"),
        ("adaptive=fast", r"`adaptive` must be one of \('none', 'gravac'\); got 'fast'"),
        ("adaptive=gravac,gravac_windw=5", r"unknown GraVAC parameter.*'windw'"),
        ("densty=0.1", r"unknown compression option 'densty'.*allowed"),
        ("missing/compression.yaml", r"does not exist"),
    ],
)
def test_flag_rejects_bad_values(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(parse_setting(text))


def test_gravac_flag_forms_agree(tmp_path: Path) -> None:
    inline = "compressor=topk,feedback=ef,adaptive=gravac,gravac_window=20,gravac_scaling=geometric"
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"compression": {
        "compressor": "topk", "feedback": "ef", "adaptive": "gravac", "gravac": {"window": 20, "scaling": "geometric"},
    }}))  # fmt: skip
    want = {"window": 20, "scaling": "geometric"}
    for text in (inline, str(nested)):
        assert adaptive_options(parse_setting(text)) == want
        assert adaptive_from_env({ENV_VAR: text}) == want
        assert resolve(parse_setting(text)) == CompressionConfig(compressor="topk", feedback="ef")
    config = resolve(parse_setting(inline))
    assert adaptive_options(parse_setting(to_inline(config, want))) == want  # what the launcher hands the workers
    assert adaptive_options(parse_setting("compressor=topk,feedback=ef")) is None
    with pytest.raises(ValueError, match=r"GraVAC parameters \['window'\] are set but `adaptive` is 'none'"):
        adaptive_options(parse_setting("compressor=topk,gravac_window=20"))
    p = plan(["--cpu", "--num_processes", "2", "--compressor", "topk", "--feedback", "ef", "--adaptive", "gravac",
              "--gravac", "window=50,epsilon=0.5", "train.py"], environ={})  # fmt: skip
    assert p["adaptive"] == {"window": 50, "epsilon": 0.5}
    assert adaptive_from_env(p["env"]) == {"window": 50, "epsilon": 0.5}


def test_gravac_under_the_launcher_decides_alike_and_resumes(tmp_path: Path, train_script: Path) -> None:
    env = _env(ACCELERATE_COMPRESSION_STATS=str(tmp_path / "stats"))
    gravac = ["--compressor", "topk", "--feedback", "ef", "--adaptive", "gravac",
              "--gravac", "theta_min=2,theta_max=64,epsilon=0.3,window=4,scaling=geometric,omega=0"]  # fmt: skip
    common = ["--cpu", "--num_processes", "2", *gravac]
    ckpt = tmp_path / "ckpt"
    first = ["--save-at", "8", "--save-dir", str(ckpt), "--out", str(tmp_path / "full")]
    again = ["--resume-dir", str(ckpt), "--start", "8", "--out", str(tmp_path / "resumed")]
    _run(_launcher(*common, "--main_process_port", str(free_port()), str(train_script), *first), env, tmp_path)
    full_stats = _ranks(tmp_path / "stats")
    _run(_launcher(*common, "--main_process_port", str(free_port()), str(train_script), *again), env, tmp_path)
    resumed_stats = _ranks(tmp_path / "stats")
    full, resumed = _ranks(tmp_path / "full"), _ranks(tmp_path / "resumed")
    assert full[0]["sha"] == full[1]["sha"] == resumed[0]["sha"] == resumed[1]["sha"]
    schedule = [{k: v for k, v in s["adaptive"].items() if k != "throughput"} for s in full_stats + resumed_stats]
    assert all(s == schedule[0] for s in schedule), schedule  # both ranks, both runs: one schedule
    assert schedule[0]["steps"] == 16 and max(schedule[0]["theta_s"], 1) > 1
    blob = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    assert all(r["adaptive"]["steps"] == 8 for r in blob["ranks"])


def test_plan_strips_section_and_options_override_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    accelerate_cfg = {"distributed_type": "MULTI_CPU", "mixed_precision": "no"}  # what Accelerate's reader accepts
    cfg.write_text(yaml.safe_dump({**accelerate_cfg, "compression": {"compressor": "topk", "density": 0.1}}))
    argv = ["--config_file", str(cfg), "--cpu", "--num_processes", "2", "--compressor=qsgd", "--bits", "4",
            "--feedback", "diana", "train.py", "--bits", "9"]  # fmt: skip
    p = plan(argv, environ={ENV_VAR: "compressor=sign,block_size=128"})
    # options > file > environment; the script's own --bits is untouched
    assert p["config"] == CompressionConfig(compressor="qsgd", density=0.1, bits=4, feedback="diana", block_size=128)
    assert p["stripped_config"] == accelerate_cfg
    assert p["accelerate_args"] == ["--multi_gpu", "--config_file", str(cfg), "--num_processes", "2"]
    assert p["tail"] == ["-m", "accelerate_compress._bootstrap", "train.py", "--bits", "9"]
    assert resolve(parse_setting(p["env"][ENV_VAR])) == p["config"] and p["env"]["ACCELERATE_USE_CPU"] == "true"
    # no setting anywhere: plain accelerate launch, no instrumentation
    bare = plan(["--num_processes", "1", "-m", "pkg.train", "x"], environ={})
    assert bare["config"] is None and bare["tail"] == ["pkg.train", "x"] and "-m" in bare["accelerate_args"]
    mod = plan(["-m", "pkg.train", "x"], environ={ENV_VAR: "compressor=sign"})
    assert mod["tail"] == ["-m", "accelerate_compress._bootstrap", "--module", "pkg.train", "x"]


def test_enable_is_a_noop_on_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = types.SimpleNamespace(num_processes=1, register_for_checkpointing=None)
    with pytest.warns(UserWarning, match="is NOT enabled: this run has one process"):
        assert enable(accelerator, nn.Linear(64, 64), "compressor=sign") is None
    with pytest.raises(RuntimeError, match="after `model = accelerator.prepare"):
        enable(types.SimpleNamespace(num_processes=2), nn.Linear(64, 64))


def test_memory_follows_the_loss_scale() -> None:
    from accelerate_compress.adapter import _follow_loss_scale
    from lightning_compress import CompressionState

    class Scaler:  # GradScaler's interface: update() may grow the scale, or halve it on overflow
        def __init__(self) -> None:
            self.scale, self.factors = 1024.0, [2.0, 1.0, 0.5]

        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return self.scale

        def update(self) -> None:
            self.scale *= self.factors.pop(0)

    state = CompressionState(CompressionConfig(compressor="sign"), {})
    state.memory["w"] = {"residual": torch.ones(4)}
    scaler = Scaler()
    _follow_loss_scale(scaler, state)
    _follow_loss_scale(scaler, state)  # wrapped once only
    expected = [2.0, 2.0, 1.0]
    for want in expected:
        scaler.update()
        assert torch.equal(state.memory["w"]["residual"], torch.full((4,), want))


def test_adapter_source_does_not_import_lightning() -> None:
    for path in (ROOT / "accelerate_compress").glob("*.py"):
        text = path.read_text()
        assert "import lightning\n" not in text and "from lightning." not in text and "from lightning " not in text


# ----- the launcher refuses bad settings before any worker starts ----------------------------------
def test_bad_flag_stops_launcher_before_any_worker(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    script = tmp_path / "touch.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    args = ["--cpu", "--num_processes", "2", "--main_process_port", str(free_port()), "--compressor", "sgn"]
    proc = subprocess.run(_launcher(*args, str(script)), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "invalid compression setting: `compressor` must be one of" in proc.stderr
    assert "got 'sgn'" in proc.stderr and "'sign'" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "how, match",
    [
        (["--adaptive", "gravac"], ["adaptive=gravac", "GraVAC adapts the compression factor of", "'sign'"]),
        (
            ["--adaptive", "gravac", "--compressor", "topk", "--feedback", "ef", "--density_warmup_steps", "5"],
            ["adaptive=gravac", "density warm-up", "density_warmup_steps=0"],
        ),
        (["--adaptive", "gravac", "--compressor", "topk", "--feedback", "ef", "--gravac", "epsilon=2"], ["epsilon"]),
        (["--density", "two"], ["--density", "'two'", "a number"]),
        ("yaml", ["`density`", "2.0", "(0, 1]"]),
        ("env", ["`bits`", "3", "(1, 2, 4, 8)"]),
    ],
)
def test_bad_flag_messages_name_key_value_and_allowed(tmp_path: Path, monkeypatch, capsys, how, match) -> None:
    from accelerate_compress import launcher

    def no_worker(*args, **kwargs):
        raise AssertionError(f"a worker was started: {args}")

    monkeypatch.setattr(launcher, "_accelerate_launch", no_worker)
    monkeypatch.delenv(ENV_VAR, raising=False)
    args = ["--cpu", "--num_processes", "2"]
    if how == "yaml":
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("compression:\n  compressor: topk\n  density: 2.0\n")
        args += ["--config_file", str(cfg)]
    elif how == "env":
        monkeypatch.setenv(ENV_VAR, "compressor=qsgd,bits=3,feedback=diana")
    else:
        args += how
    assert launcher.main(["launch", *args, "train.py"]) == 2
    err = capsys.readouterr().err
    assert "invalid compression setting" in err
    for piece in match:
        assert piece in err, err


# ----- through the real `accelerate launch`, 2 CPU processes -----------------------------------------
def test_yaml_flag_turns_compression_on_script_unchanged(tmp_path: Path, train_script: Path) -> None:
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "use_cpu": True, "main_process_port": free_port(),
        "compression": {"compressor": "sign", "feedback": "ef"},
    }))  # fmt: skip
    stats = tmp_path / "stats"
    _run(_launcher("--config_file", str(cfg), str(train_script), "--out", str(tmp_path / "out")),
         _env(ACCELERATE_COMPRESSION_STATS=str(stats)), tmp_path)  # fmt: skip
    ranks, st = _ranks(tmp_path / "out"), _ranks(stats)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["sha"] == ranks[1]["sha"]
    assert [s["steps"] for s in st] == [16, 16] and st[0]["config"]["compressor"] == "sign"
    # the launcher's instrumentation moves the SGD momentum once the optimizer is prepared
    assert [s["momentum"] for s in st] == ["lookahead", "lookahead"]
    assert st[0]["dense_bytes_last_step"] == 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    want = _expected_ratio(CompressionConfig(compressor="sign", feedback="ef"))
    assert want > 20 and st[0]["ratio"] == pytest.approx(want, rel=0.01)


def test_environment_flag_under_plain_accelerate_launch_with_accumulate(tmp_path: Path, train_script: Path) -> None:
    # Plain `accelerate launch` (torchrun path; ACCELERATE_USE_CPU makes the workers use gloo on CPU):
    # the script calls enable(), which reads ACCELERATE_COMPRESSION.
    setting = "compressor=sign,feedback=doublesqueeze"
    stats = tmp_path / "stats"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(train_script), "--enable", "--accum", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    env = _env(ACCELERATE_USE_CPU="true", ACCELERATE_COMPRESSION_STATS=str(stats), **{ENV_VAR: setting})
    _run(cmd, env, tmp_path)
    ranks, st = _ranks(tmp_path / "out"), _ranks(stats)
    assert ranks[0]["sha"] == ranks[1]["sha"] and [r["batches"] for r in ranks] == [16, 16]
    # accumulate(): 16 backward passes, 8 synchronized ones -> the hook ran (and compressed) 8 times
    assert [s["steps"] for s in st] == [8, 8] and [s["step"] for s in st] == [8, 8]
    assert st[0]["config"] == CompressionConfig.from_string(setting).to_dict()
    assert [s["momentum"] for s in st] == ["lookahead", "lookahead"]  # enable() after prepare() finds the optimizer
    assert st[0]["ratio"] == pytest.approx(_expected_ratio(CompressionConfig.from_string(setting)), rel=0.02)


def test_save_state_load_state_resume_exactly(tmp_path: Path, train_script: Path) -> None:
    # The launcher with the environment form of the flag; the first run does not call enable() (auto-instrumented),
    # the resumed one does as well (it must get the same state back, registered once).
    env = _env(**{ENV_VAR: "compressor=sign,feedback=doublesqueeze"})
    common = ["--cpu", "--num_processes", "2"]
    ckpt = tmp_path / "ckpt"
    first = ["--save-at", "8", "--save-dir", str(ckpt), "--out", str(tmp_path / "full")]
    again = ["--enable", "--resume-dir", str(ckpt), "--start", "8", "--out", str(tmp_path / "resumed")]
    _run(_launcher(*common, "--main_process_port", str(free_port()), str(train_script), *first), env, tmp_path)
    _run(_launcher(*common, "--main_process_port", str(free_port()), str(train_script), *again), env, tmp_path)
    full, resumed = _ranks(tmp_path / "full"), _ranks(tmp_path / "resumed")
    assert [r["custom"] for r in full + resumed] == [1, 1, 1, 1]
    assert full[0]["sha"] == full[1]["sha"] == resumed[0]["sha"] == resumed[1]["sha"]
    blob = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    assert blob["world_size"] == 2 and [r["rank"] for r in blob["ranks"]] == [0, 1]
    assert all(r["step"] == 8 for r in blob["ranks"])
    mem0, mem1 = (r["memory"]["2.weight"]["residual"] for r in blob["ranks"])
    assert mem0.abs().sum() > 0 and not torch.equal(mem0, mem1)  # per-rank memory, both kept
    assert blob["ranks"][0]["server_memory"] and blob["ranks"][1]["server_memory"]


def test_example_accuracy_within_one_point_of_dense_with_launcher_options(tmp_path: Path) -> None:
    # The example, unchanged, dense and with `--compressor sign` (error feedback); both launched at once.
    runs = {"dense": [], "sign": ["--compressor", "sign"]}
    procs = {}
    for name, options in runs.items():
        cmd = _launcher("--cpu", "--num_processes", "2", "--main_process_port", str(free_port()), *options,
                        str(EXAMPLE), "--output", str(tmp_path / name))  # fmt: skip
        env = _env(ACCELERATE_COMPRESSION_STATS=str(tmp_path / f"{name}_stats"))
        procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, f"{name}:\n{out[-2000:]}\n{err[-4000:]}"
    dense, sign = _ranks(tmp_path / "dense"), _ranks(tmp_path / "sign")
    for ranks in (dense, sign):
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert not (tmp_path / "dense_stats").exists()  # no setting: plain accelerate launch, nothing enabled
    st = _ranks(tmp_path / "sign_stats")
    assert st[0]["ratio_total"] == pytest.approx(_expected_ratio(CompressionConfig(compressor="sign")), rel=0.01)
    assert dense[0]["accuracy"] > 0.95
    assert abs(sign[0]["accuracy"] - dense[0]["accuracy"]) <= 0.01, (sign[0]["accuracy"], dense[0]["accuracy"])
