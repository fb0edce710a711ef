"""Failure modes, on 2 gloo ranks where it takes two: ranks that disagree, checkpoints that do not fit,
values that overflow, sparse and huge parameters, misspelled options, Fabric resume.

Multi-process tests run under :func:`run_bounded`: a short process-group timeout and a join
deadline, so a regression fails instead of hanging. Assertions run inside the workers.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_compress import CompressionConfig, CompressionState, attach_optimizer, register_compression
from tests._dist import free_port, gather_flat, run_distributed

BASE = dict(block_size=32, min_numel=64)


def run_bounded(fn, *args, pg_timeout_s: int = 60, deadline_s: int = 240) -> None:
    """``fn(rank, 2, *args)`` on 2 gloo ranks, warnings shown; fails (never hangs) if a rank fails or runs past ``deadline_s``."""
    run_distributed(fn, *args, timeout=deadline_s, collective_timeout=pg_timeout_s, quiet=False)


def _exit_now() -> None:
    """Leave a worker whose process group holds an unfinished collective (no barrier: it would not match)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4))


def make_data(rank: int):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 + rank))
    return x, torch.tanh(x[:, :4])


def wrap(model: nn.Module) -> DDP:
    return DDP(model, bucket_cap_mb=0.004)  # each 48x48 weight in its own bucket


def train(ddp, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()


def raises_on_every_rank(fn, *needles: str) -> str:
    """Run ``fn``; it must raise a RuntimeError whose message holds every needle."""
    try:
        fn()
    except RuntimeError as err:
        text = str(err)
    else:
        raise AssertionError("no RuntimeError")
    for needle in needles:
        assert needle in text, f"{needle!r} not in the message:\n{text}"
    return text


# ----- 1. ranks must agree -------------------------------------------------------------------------
# field, rank 0's settings, rank 1's settings (on top of BASE)
DISAGREEMENTS = [
    ("feedback", dict(compressor="sign", feedback="ef"), dict(compressor="sign", feedback="doublesqueeze")),
    ("warmup_steps", dict(warmup_steps=0), dict(warmup_steps=2)),
    ("min_numel", dict(min_numel=64), dict(min_numel=128)),
    ("transport", dict(compressor="sign", transport="allgather"), dict(compressor="sign", transport="two_pass")),
    ("compressor", dict(compressor="sign"), dict(compressor="topk", density=0.1)),
    ("density", dict(compressor="topk", density=0.1), dict(compressor="topk", density=0.2)),
    ("block_size", dict(block_size=32), dict(block_size=64)),
    ("bits", dict(compressor="qsgd", bits=8), dict(compressor="qsgd", bits=4, block_size=16)),
    ("feedback", dict(compressor="topk", density=0.1, feedback="ef"),
     dict(compressor="topk", density=0.1, feedback="ef21")),
    ("seed", dict(compressor="randk", density=0.25, feedback="diana", seed=0),
     dict(compressor="randk", density=0.25, feedback="diana", seed=1)),
]  # fmt: skip


def _registration_worker(rank, world):
    for field, *settings in DISAGREEMENTS:
        options = {**BASE, **settings[rank]}
        values = [repr({**BASE, **s}[field]) for s in settings]
        configs = [CompressionConfig(**{**BASE, **s}).to_dict() for s in settings]
        differing = [k for k in configs[0] if configs[0][k] != configs[1][k]]
        assert field in differing
        ddp = wrap(make_model())
        raises_on_every_rank(
            lambda ddp=ddp, options=options: register_compression(ddp, CompressionConfig(**options)),
            f"disagree on {', '.join(differing)} (at registration)",
            f"`{field}`: rank 0 {values[0]}; rank 1 {values[1]}",
        )
    # Same shapes, other names (DDP checks shapes only): the parameters differ.
    model = make_model()
    if rank == 1:
        renamed = nn.Sequential()
        for i, layer in enumerate(model):
            renamed.add_module(f"layer{i}", layer)
        model = renamed
    raises_on_every_rank(
        lambda: register_compression(wrap(model), CompressionConfig(**BASE)),
        "`parameters`", "rank 0 6 tensors, #0 '0.weight' (48, 16)", "rank 1 6 tensors, #0 'layer0.weight' (48, 16)",
    )  # fmt: skip
    # After all that, ranks that agree register and train.
    ddp = wrap(make_model())
    register_compression(ddp, CompressionConfig(**BASE))
    x, y = make_data(rank)
    train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), x, y, 2)


def test_settings_check_compares_the_block_size_that_runs():
    from lightning_compress.agreement import describe

    unset = describe(_state(CompressionConfig(feedback="doublesqueeze", min_numel=64)))
    assert unset["block_size"] == 256  # what runs, so an unset and an explicit 256 agree
    assert unset == describe(_state(CompressionConfig(feedback="doublesqueeze", block_size=256, min_numel=64)))
    assert describe(_state(CompressionConfig(feedback="doublesqueeze", block_size=1024, min_numel=64)))["block_size"] == 1024


def test_ranks_with_different_settings_stop_at_registration_naming_field_and_values():
    run_bounded(_registration_worker)


def _saved_states(steps: int, rank: int, cfg: CompressionConfig) -> list[dict]:
    """This rank's compression state after 0, 1, ..., ``steps`` steps of a run of its own."""
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    x, y = make_data(rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    saved = [state.state_dict()]
    for _ in range(steps):
        train(ddp, opt, x, y, 1)
        saved.append(state.state_dict())
    return saved


def _load_worker(rank, world):
    cfg = CompressionConfig(compressor="sign", feedback="ef", **BASE)
    x, y = make_data(rank)
    saved_at = _saved_states(3, rank, cfg)
    saved = saved_at[3]

    # Only rank 0 loads, before the first step: the first step's check runs on every rank.
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if rank == 0:
        state.load_state_dict(saved)
    raises_on_every_rank(lambda: train(ddp, opt, x, y, 1), "`step`: rank 0 3; rank 1 0", "at the first step")

    # Every rank loads, but not the same step: checked at the next step, after training started.
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    train(ddp, opt, x, y, 2)
    state.load_state_dict(saved_at[1 + 2 * rank])  # rank 0 loads its state of step 1, rank 1 that of step 3
    raises_on_every_rank(lambda: train(ddp, opt, x, y, 1), "`step`: rank 0 1; rank 1 3", "after load_state_dict")

    # Every rank loads its own state of the same step, after training started: checked once, training goes on.
    # (A DDP model whose backward raised cannot run again: a new one.)
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    train(ddp, opt, x, y, 1)
    state.load_state_dict(saved)
    assert state.agreement_due() == "at the first step after load_state_dict"
    train(ddp, opt, x, y, 2)
    assert state.step == 5 and state.agreement_due() is None

    # The momentum moved into the exchange on one rank but not on the other (SGD with / without momentum).
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9 if rank == 0 else 0.0)
    attach_optimizer(state, opt)
    raises_on_every_rank(
        lambda: train(ddp, opt, x, y, 1),
        "`momentum`: rank 0 {'optimizer': 'sgd', 'mode': 'lookahead', 'steps_taken': 0}; rank 1 None",
    )


def test_loads_and_optimizers_that_differ_stop_every_rank_at_the_next_step():
    run_bounded(_load_worker)


def _lone_load_worker(rank, world):
    """State loaded on rank 0 only, after training started: rank 0 cannot know its peer did not load until the
    peer fails to join the check. Once training started the check waits LIGHTNING_COMPRESS_CHECK_TIMEOUT seconds,
    not the process group's timeout (200 s here): rank 0 stops saying why, never issuing a gradient collective its
    peer does not match, and when it exits its peer's pending gradient exchange fails at once."""
    cfg = CompressionConfig(compressor="sign", feedback="ef", **BASE)
    x, y = make_data(rank)
    ddp = wrap(make_model())
    os.environ["LIGHTNING_COMPRESS_CHECK_TIMEOUT"] = "2 minutes"  # read at registration: a typo stops the run there
    with pytest.raises(ValueError, match="LIGHTNING_COMPRESS_CHECK_TIMEOUT must be a number of seconds"):
        register_compression(ddp, cfg)
    os.environ["LIGHTNING_COMPRESS_CHECK_TIMEOUT"] = "3"
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    train(ddp, opt, x, y, 3)
    assert state.started
    if rank == 0:
        state.load_state_dict(state.state_dict() | {"step": 1})
    start = time.monotonic()
    if rank == 0:
        raises_on_every_rank(
            lambda: train(ddp, opt, x, y, 1), "rank 0's settings check", "did not join it within 0:00:03",
            "a peer stopped", "on some ranks only after training started", "load_state_dict (attach_optimizer",
            "on every rank", "LIGHTNING_COMPRESS_CHECK_TIMEOUT=<seconds>", "step=1",
        )
        assert time.monotonic() - start < 30
    else:
        with pytest.raises(RuntimeError):  # rank 0 never joins its gradient exchange, and then exits
            train(ddp, opt, x, y, 1)
        assert time.monotonic() - start < 60  # far below the process group's 200 s
    _exit_now()


def test_state_loaded_on_one_rank_after_training_started_stops_within_the_check_timeout():
    run_bounded(_lone_load_worker, pg_timeout_s=200, deadline_s=150)


def test_check_timeout_after_start_is_read_from_the_environment(monkeypatch):
    from lightning_compress.agreement import AFTER_START_TIMEOUT_S, after_start_timeout

    monkeypatch.delenv("LIGHTNING_COMPRESS_CHECK_TIMEOUT", raising=False)
    assert after_start_timeout() == AFTER_START_TIMEOUT_S
    monkeypatch.setenv("LIGHTNING_COMPRESS_CHECK_TIMEOUT", "2.5")
    assert after_start_timeout() == 2.5
    for bad in ("0", "-3", "soon", "nan", "inf", "1e-9", "120s"):
        monkeypatch.setenv("LIGHTNING_COMPRESS_CHECK_TIMEOUT", bad)
        with pytest.raises(ValueError, match="LIGHTNING_COMPRESS_CHECK_TIMEOUT must be a number of seconds"):
            after_start_timeout()



# ----- 2. checkpoints that do not fit are refused or start fresh, never half-applied ----------------------
def _state(config: CompressionConfig, model: nn.Module | None = None) -> CompressionState:
    """A single-process state for ``model`` (names and shapes as register_compression records them)."""
    model = model or make_model()
    named = list(model.named_parameters())
    return CompressionState(config, {id(p): n for n, p in named}, param_shapes={n: p.shape for n, p in named})


def _saved(cfg: CompressionConfig, **changes) -> dict:
    """A format-2 state at step 7 with memory for two weights, and ``changes`` applied."""
    state = _state(cfg)
    state.step = 7
    for name in ("2.weight", "4.weight"):
        numel = torch.Size(state.param_shapes[name]).numel()
        state.memory[name] = {key: torch.full((numel,), 0.5) for key in state.feedback.memory_keys}
    sd = state.state_dict()
    sd.update(changes)
    return sd


def _unchanged(state: CompressionState) -> tuple:
    return state.step, state.config, dict(state.memory), dict(state.velocity)


def test_missing_keys_and_foreign_formats_are_refused_by_name():
    cfg = CompressionConfig(**BASE)
    state = _state(cfg)
    before = _unchanged(state)
    with pytest.raises(ValueError, match=r"missing the key\(s\) \['format', 'world_size', 'step', 'config', 'memory'"):
        state.load_state_dict({})
    with pytest.raises(TypeError, match="takes the dict"):
        state.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="format 3 is not supported"):
        state.load_state_dict(_saved(cfg, format=3))
    with pytest.raises(ValueError, match="saved compression config is not valid: .*compresor"):
        state.load_state_dict(_saved(cfg, config={**cfg.to_dict(), "compresor": "topk"}))
    with pytest.raises(ValueError, match="rank 1's compression state, but this process is rank 0"):
        state.load_state_dict(_saved(cfg, rank=1))
    assert _unchanged(state) == before, "a refused state changed something"


def test_memory_of_another_shape_name_or_size_starts_fresh_with_a_warning_naming_it():
    cfg = CompressionConfig(**BASE)
    sd = _saved(cfg)
    # the same element count, another shape (a transposed layer), a name the model lacks, another size
    sd["shapes"]["2.weight"] = [24, 96]
    sd["memory"]["gone.weight"] = {"residual": torch.ones(10)}
    sd["shapes"]["gone.weight"] = [2, 5]
    sd["memory"]["0.weight"] = {"residual": torch.ones(10)}
    state = _state(cfg)
    with pytest.warns(UserWarning) as record:
        state.load_state_dict(sd)
    text = " ".join(str(w.message) for w in record)
    assert "'2.weight': saved for shape (24, 96), the parameter has shape (48, 48)" in text
    assert "'gone.weight': not a parameter of this model" in text
    assert "'0.weight': residual holds 10 values, 768 expected" in text
    assert set(state.memory) == {"4.weight"} and state.step == 7
    assert "gone.weight" not in state.state_dict()["memory"], "entries for other models are not saved again"


def test_format_1_states_still_load():
    cfg = CompressionConfig(**BASE)
    sd = _saved(cfg)
    for key in ("shapes", "adjusted"):
        del sd[key]
    sd["format"] = 1
    state = _state(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.load_state_dict(sd)
    assert set(state.memory) == {"2.weight", "4.weight"} and state.step == 7
    assert state.state_dict()["format"] == 2 and state.state_dict()["shapes"]["2.weight"] == [48, 48]


def test_non_finite_memory_starts_fresh_or_is_refused_where_ranks_share_it():
    cfg = CompressionConfig(**BASE)
    sd = _saved(cfg)
    sd["memory"]["2.weight"]["residual"][3] = float("nan")
    sd["velocity"] = {"4.weight": torch.full((48 * 48,), float("inf"))}
    state = _state(cfg)
    with pytest.warns(UserWarning, match=r"memory of '2.weight': residual holds NaN/inf.*velocity of '4.weight'"):
        state.load_state_dict(sd)
    assert set(state.memory) == {"4.weight"} and state.velocity == {}
    shared = CompressionConfig(compressor="topk", density=0.1, feedback="ef21", **BASE)
    sd = _saved(shared)
    sd["memory"]["4.weight"]["global"][0] = float("inf")
    state = _state(shared)
    with pytest.raises(ValueError, match=r"ef21 memory of '4.weight': global holds NaN/inf.*cannot restart"):
        state.load_state_dict(sd)
    assert state.step == 0 and state.memory == {}


def test_density_and_bits_come_from_the_checkpoint_only_when_a_controller_set_them():
    # A compressor change: the run's bits stay (qsgd, bits=4 no longer becomes 8), with a warning naming both.
    state = _state(CompressionConfig(compressor="qsgd", bits=4, **{**BASE, "block_size": 16}))
    with pytest.warns(UserWarning, match=r"uses `bits=4` as configured; the checkpoint was saved with `bits=8`"):
        state.load_state_dict(_saved(CompressionConfig(**BASE)))
    assert state.config.bits == 4 and state.compressor.bits == 4
    # randk at 0.9 after a topk checkpoint at 0.01: 0.9 runs (it used to fail on the restored 0.01).
    state = _state(CompressionConfig(compressor="randk", density=0.9, feedback="ef", **BASE))
    with pytest.warns(UserWarning, match=r"`density=0.9` as configured; the checkpoint was saved with `density=0.01`"):
        state.load_state_dict(_saved(CompressionConfig(compressor="topk", **BASE)))
    assert state.config.density == 0.9
    # The same compressor, density changed by the user at resume: the user's value runs, with a warning.
    state = _state(CompressionConfig(compressor="topk", density=0.2, density_warmup_steps=0, **BASE))
    with pytest.warns(UserWarning, match=r"`density=0.2` as configured; the checkpoint was saved with `density=0.1`"):
        state.load_state_dict(_saved(CompressionConfig(compressor="topk", density=0.1, density_warmup_steps=0, **BASE)))
    assert state.config.density == 0.2 and state.compressor.density == 0.2
    # A controller changed it (request_update): the checkpoint's value comes back, with a warning naming both.
    controlled = _state(CompressionConfig(compressor="topk", density=0.1, **BASE))
    controlled.request_update(density=0.05)
    controlled.finish_step()
    state = _state(CompressionConfig(compressor="topk", density=0.1, **BASE))
    with pytest.warns(UserWarning, match=r"`density=0.05` from the checkpoint \(set there by a controller\) replaces "
                                         r"this run's `density=0.1`"):  # fmt: skip
        state.load_state_dict(controlled.state_dict())
    assert state.config.density == 0.05 and state.state_dict()["adjusted"] == ["density"]
    # ... but not into another compressor.
    state = _state(CompressionConfig(compressor="randk", density=0.5, feedback="diana", **BASE))
    with pytest.warns(UserWarning, match="`density=0.5` as configured"):
        state.load_state_dict(controlled.state_dict())
    assert state.config.density == 0.5


def _rank_and_finite_worker(rank, world):
    """Rank 0 given rank 1's state is refused; non-finite memory starts fresh and training stays finite."""
    cfg = CompressionConfig(compressor="sign", feedback="ef", **BASE)
    x, y = make_data(rank)
    ddp = wrap(make_model())
    state = register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train(ddp, opt, x, y, 2)
    every = [None, None]
    dist.all_gather_object(every, state.state_dict())
    with pytest.raises(ValueError, match=f"rank {1 - rank}'s compression state, but this process is rank {rank}"):
        state.load_state_dict(every[1 - rank])
    mine = every[rank]
    name = next(iter(mine["memory"]))
    mine["memory"][name]["residual"].fill_(float("nan"))
    with pytest.warns(UserWarning, match=f"memory of '{name}': residual holds NaN/inf"):
        state.load_state_dict(mine)
    assert name not in state.memory
    train(ddp, opt, x, y, 3)
    assert all(torch.isfinite(t).all() for m in state.memory.values() for t in m.values())
    flat = gather_flat(ddp.parameters())
    assert torch.isfinite(flat[0]).all() and torch.equal(flat[0], flat[1])


def test_another_ranks_state_is_refused_and_non_finite_memory_never_reaches_the_parameters():
    run_bounded(_rank_and_finite_worker)


# ----- 3. memory never becomes non-finite ------------------------------------------------------------
# settings, injected value, ranks that inject it, where (a row of the middle weight, or all of it), and
# whether the bucket must go dense: a scale or norm overflows (sign's block sum, QSGD's block norm, the
# DoubleSqueeze server's aggregate), or values are huge but every scale stays finite (sent compressed).
OVERFLOWS = {
    "sign+ef, a 1e36 block": (dict(compressor="sign", feedback="ef", block_size=1024, min_numel=64), 1e36, (1,), "all",
                              True),
    "sign+ef, 3e38 row": (dict(compressor="sign", feedback="ef", **BASE), 3e38, (1,), "row", True),
    # Each rank's block sum (32 x 7.5e36) is finite, the server's (32 x 1.5e37) is not: dense from the server step.
    "sign+doublesqueeze, server": (dict(compressor="sign", feedback="doublesqueeze", **BASE), 1.5e37, (0, 1), "all",
                                   True),
    "sign+ef, same values": (dict(compressor="sign", feedback="ef", **BASE), 1.5e37, (0, 1), "all", False),
    "topk+ef, 1e36": (dict(compressor="topk", density=0.1, feedback="ef", **BASE), 1e36, (1,), "row", False),
    "topk+ef21, 3e38 both": (dict(compressor="topk", density=0.1, feedback="ef21", **BASE), 3e38, (0, 1), "row", False),
    "qsgd+ef, 1e36": (dict(compressor="qsgd", feedback="ef", **BASE), 1e36, (1,), "row", False),
    "qsgd+ef, 3e38 (block norm overflows)": (dict(compressor="qsgd", feedback="ef", **BASE), 3e38, (1,), "row", True),
    "qsgd+doublesqueeze, 3e38": (dict(compressor="qsgd", feedback="doublesqueeze", **BASE), 3e38, (1,), "row", True),
    # GraVAC sends through its own path: a non-finite level skips the step densely (its count is not kept).
    "qsgd+ef+GraVAC, 3e38": (dict(compressor="qsgd", feedback="ef", **BASE), 3e38, (1,), "row", None, True),
    "topk+ef+GraVAC, 3e38": (dict(compressor="topk", feedback="ef", **BASE), 3e38, (1,), "row", None, True),
}  # fmt: skip


def _all_memory(state) -> list[torch.Tensor]:
    return [t for m in state.memory.values() for t in m.values()] + list(state.server_memory.values())


def _overflow_worker(rank, world, options, value, injectors, where, dense, gravac=False):
    from lightning_compress import attach_gravac

    x, y = make_data(rank)
    model = make_model()
    ddp = wrap(model)
    state = register_compression(ddp, CompressionConfig(**options))
    if gravac:
        attach_gravac(state, window=2, theta_min=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train(ddp, opt, x, y, 3)
    target = model[2].weight  # the middle weight, a bucket of its own
    before = {name: {k: t.clone() for k, t in m.items()} for name, m in state.memory.items()}
    server_before = {name: t.clone() for name, t in state.server_memory.items()}

    def inject(g):
        g = g.clone()
        (g[0] if where == "row" else g).fill_(value)
        return g

    opt.zero_grad()
    handle = target.register_hook(inject) if rank in injectors else None
    nn.functional.mse_loss(ddp(x), y).backward()
    if handle is not None:
        handle.remove()
    if dense is not None:
        assert state.stats.fallback_buckets_last_step == int(dense), state.stats
    assert all(torch.isfinite(t).all() for t in _all_memory(state)), "memory became non-finite"
    assert torch.isfinite(target.grad).all()
    if dense:
        local = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [target])[0]
        local = inject(local) if rank in injectors else local
        expected = torch.stack(gather_flat([local])).div(world).sum(0).view_as(local)
        torch.testing.assert_close(target.grad, expected, rtol=1e-6, atol=0)
        name = next(n for n, p in model.named_parameters() if p is target)
        assert all(torch.equal(t, before[name][k]) for k, t in state.memory[name].items()), "memory changed"
        if name in server_before:
            assert torch.equal(state.server_memory[name], server_before[name]), "server memory changed"
    flat = gather_flat([p.grad for p in model.parameters()])
    assert torch.equal(flat[0], flat[1]), "the ranks' averaged gradients differ"
    # Training goes on (without the injected step, as a loss scaler would skip it), finite and identical.
    train(ddp, opt, x, y, 2)
    assert all(torch.isfinite(t).all() for t in _all_memory(state))
    flat = gather_flat(model.parameters())
    assert torch.isfinite(flat[0]).all() and torch.equal(flat[0], flat[1])


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_huge_values_never_make_memory_non_finite(case):
    run_bounded(_overflow_worker, *OVERFLOWS[case])


# ----- 5. errors come early and say what to do ----------------------------------------------------------
class _Bag(nn.Module):
    """A sparse embedding (its own DDP bucket, sparse gradients) next to dense layers that are compressed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 16, sparse=True)
        self.body = nn.Sequential(nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4))

    def forward(self, idx):
        return self.body(self.emb(idx).reshape(idx.shape[0], -1))


def _sparse_worker(rank, world):
    idx = torch.randint(0, 100, (32, 3), generator=torch.Generator().manual_seed(rank))
    y = torch.randn(32, 4, generator=torch.Generator().manual_seed(50 + rank))
    ours = _Bag()
    ddp = DDP(ours, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        # What plain DDP gives the embedding: the average of the ranks' sparse gradients.
        local = torch.autograd.grad(nn.functional.mse_loss(ours(idx), y), ours.emb.weight)[0].to_dense()
        expected = torch.stack(gather_flat([local])).mean(0).view_as(local)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(idx), y).backward()
        assert ours.emb.weight.grad.is_sparse
        torch.testing.assert_close(ours.emb.weight.grad.to_dense(), expected, rtol=1e-6, atol=1e-9)
        opt.step()
    assert state.stats.compressed_last_step and state.step == 3
    assert all(torch.isfinite(t).all() for m in state.memory.values() for t in m.values())
    flat = gather_flat(ours.parameters())
    assert torch.equal(flat[0], flat[1]), "the ranks' weights differ"
    # The optimizer's momentum cannot move into the exchange for a sparse gradient: every rank says so.
    model = _Bag()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = register_compression(ddp, CompressionConfig(compressor="sign", feedback="ef", **BASE))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach_optimizer(state, opt)
    raises_on_every_rank(lambda: nn.functional.mse_loss(ddp(idx), y).backward(), "'emb.weight' gets sparse gradients",
                         "momentum='optimizer'")  # fmt: skip


def test_sparse_gradients_are_averaged_uncompressed_like_plain_ddp():
    run_bounded(_sparse_worker)


def _huge_worker(rank, world):
    ddp = DDP(nn.Linear(4, 4))
    huge = nn.Parameter(torch.empty(2**16, 2**15 + 1, device="meta"))  # 2**31 + 2**16 elements, no memory
    ddp.module.register_parameter("huge", huge)  # after wrapping: DDP never touches it
    for compressor in ("topk", "dgc"):
        expected = rf"'huge' has 2147549184 elements; `compressor='{compressor}'` sends int32"
        with pytest.raises(ValueError, match=expected):
            register_compression(ddp, CompressionConfig(compressor=compressor))
    # Exchanged densely (min_numel above it) or by a compressor without indices: accepted.
    register_compression(ddp, CompressionConfig(compressor="sign"))


def test_tensors_beyond_int32_indices_are_refused_at_registration():
    run_bounded(_huge_worker)


@pytest.mark.parametrize("which", ["trainer", "fabric"])
def test_misspelled_strategy_keywords_fail_when_the_strategy_is_built(which):
    pytest.importorskip("lightning")
    if which == "trainer":
        from lightning_compress.strategy import CompressedDDPStrategy
    else:
        from lightning_compress.fabric import CompressedDDPStrategy
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'compresor' \(did you mean 'compressor'\?\)"):
        CompressedDDPStrategy(compresor="topk")
    with pytest.raises(TypeError, match=r"'save_compresion_memory' \(did you mean 'save_compression_memory'\?\)"):
        CompressedDDPStrategy(save_compresion_memory=False)
    with pytest.raises(TypeError, match=r"'find_unused_parameter' \(did you mean 'find_unused_parameters'\?\)"):
        CompressedDDPStrategy(find_unused_parameter=True)
    # DistributedDataParallel's own keywords still pass through.
    strategy = CompressedDDPStrategy(compressor="topk", bucket_cap_mb=4, find_unused_parameters=True, static_graph=False)
    assert strategy.compression_config.compressor == "topk"


ACCELERATE_CONFIG = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        (ACCELERATE_CONFIG + "compresion:\n  compressor: sign\n", "unknown key `compresion:`; did you mean `compression:`?"),
        (ACCELERATE_CONFIG + "num_proceses: 3\ncompression:\n  compressor: sign\n",
         "accelerate rejects --config_file '{path}': The config file at {path} had unknown keys (['num_proceses'])"),
        (ACCELERATE_CONFIG + "compression:\n  compressor: sign\n   feedback: ef\n",
         "is not valid YAML: mapping values are not allowed here at line 7, column 12"),
    ],
    ids=["misspelled section", "unknown Accelerate key", "malformed YAML"],
)
def test_launcher_reports_config_file_errors_in_one_line(tmp_path, monkeypatch, capsys, text, expected):
    from accelerate_compress import launcher
    from accelerate_compress.flag import ENV_VAR

    def no_worker(*args, **kwargs):
        raise AssertionError(f"a worker was started: {args}")

    monkeypatch.setattr(launcher, "_accelerate_launch", no_worker)
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert launcher.main(["launch", "--config_file", str(cfg), "train.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("accelerate-compress: error: ") and expected.format(path=cfg) in err, err


def test_launcher_shows_accelerates_own_message_when_accelerate_launch_refuses(monkeypatch, capsys):
    import accelerate.commands.launch as accelerate_launch

    from accelerate_compress import launcher

    def refuse(args):
        raise ValueError("You need to select a `--num_processes`\n  when using MULTI_CPU.")

    monkeypatch.setattr(accelerate_launch, "launch_command", refuse)
    assert launcher._accelerate_launch(["train.py"], {}) == 1
    err = capsys.readouterr().err
    assert err == ("accelerate-compress: error: accelerate launch: ValueError: You need to select a `--num_processes` "
                   "when using MULTI_CPU.\n")  # fmt: skip


def test_an_empty_compression_file_means_the_defaults_for_the_launcher_and_enable(tmp_path):
    from accelerate_compress.flag import ENV_VAR, config_from_env
    from accelerate_compress.launcher import plan

    empty = tmp_path / "compression.yaml"
    empty.write_text("")
    environ = {ENV_VAR: str(empty)}
    assert config_from_env(environ) == CompressionConfig()  # what enable() takes
    assert plan(["--cpu", "--num_processes", "2", "train.py"], environ=environ)["config"] == CompressionConfig()
    # An empty section of an --config_file turns it on alike; a file without a section does not.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(ACCELERATE_CONFIG + "compression:\n")
    assert plan(["--config_file", str(cfg), "train.py"], environ={})["config"] == CompressionConfig()
    cfg.write_text(ACCELERATE_CONFIG)
    assert plan(["--config_file", str(cfg), "train.py"], environ={})["config"] is None
    # A file holding only the section: accelerate launch goes by its flags, not an empty config it would refuse.
    cfg.write_text("compression:\n  compressor: topk\n")
    p = plan(["--config_file", str(cfg), "--cpu", "--num_processes", "2", "train.py"], environ={})
    assert p["config"].compressor == "topk" and p["stripped_config"] is None
    assert "--config_file" not in p["accelerate_args"]


# ----- 6. Fabric resume keeps the user's values ---------------------------------------------------------------
def _fabric_loop(fabric, total: int, save_at, path: str, resume: bool):
    from lightning_compress.strategy import CHECKPOINT_KEY

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
    net = make_model()
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    compression = fabric.strategy.compression_state
    state = {"model": model, "optimizer": opt, "step": 0, "meta": {"note": "fresh"}}
    if resume:
        remainder = fabric.load(path, state)
        assert state["step"] == save_at and state["meta"] == {"note": f"saved at {save_at}"}, state
        assert CHECKPOINT_KEY not in remainder and CHECKPOINT_KEY not in state
        assert compression.step == save_at
    while state["step"] < total:
        i = ((state["step"] % 4) * 2 + fabric.global_rank) * 8
        opt.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x[i : i + 8]), y[i : i + 8]))
        opt.step()
        state["step"] += 1
        if state["step"] == save_at and not resume:
            state["meta"] = {"note": f"saved at {save_at}"}
            fabric.save(path, state)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).tolist()


def test_fabric_load_restores_plain_entries_and_resumes_where_it_stopped(tmp_path):
    pytest.importorskip("lightning")
    from lightning.fabric import Fabric

    from lightning_compress.fabric import CompressedDDPStrategy as FabricStrategy

    def run(resume: bool):
        os.environ["MASTER_PORT"] = str(free_port())
        strategy = FabricStrategy(start_method="fork", compressor="sign", feedback="ef", **BASE)
        fabric = Fabric(strategy=strategy, accelerator="cpu", devices=2)
        return torch.tensor(fabric.launch(_fabric_loop, 6, 3, str(tmp_path / "state.ckpt"), resume))

    saved = os.environ.get("MASTER_PORT")
    try:
        full = run(resume=False)
        resumed = run(resume=True)
    finally:
        if saved is None:
            os.environ.pop("MASTER_PORT", None)
        else:
            os.environ["MASTER_PORT"] = saved
    assert torch.equal(full, resumed), f"max |A - B| = {(full - resumed).abs().max().item()}"


def test_integration_restore_paths_make_the_ranks_check_at_the_next_step():
    """Lightning's and Accelerate's restore paths load through CompressionState.load_state_dict: every rank runs
    them, so every rank compares digests at its next step (checked in test_loads_and_optimizers_that_differ_stop_every_rank_at_the_next_step)."""
    pytest.importorskip("lightning")
    from accelerate_compress.adapter import CompressionCheckpoint
    from lightning_compress.strategy import CompressedDDPStrategy

    saved = _saved(CompressionConfig(**BASE))
    strategy = CompressedDDPStrategy(**BASE)
    state = _state(strategy.compression_config)
    state.agreed()
    strategy._loaded_compression = {"world_size": 1, "ranks": [saved]}
    strategy._compression_state, strategy._hook_active = state, True
    strategy._apply_loaded_compression()
    assert state.step == 7 and state.agreement_due() == "at the first step after load_state_dict"
    state = _state(CompressionConfig(**BASE))
    state.agreed()
    CompressionCheckpoint(state).load_state_dict({"world_size": 1, "ranks": [saved]})
    assert state.step == 7 and state.agreement_due() == "at the first step after load_state_dict"
