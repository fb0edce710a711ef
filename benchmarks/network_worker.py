"""One rank of ``benchmarks/network.py`` (started by it, usually through ``ip netns exec``).

Modes (``--mode``):

* ``step``: time training steps of the communication-bound MLP (random data) with one gradient
  exchange configuration, then optionally (``--digits``) train the digits MLP with the same
  configuration for its final accuracy. Every rank writes a JSON file (``--out``) with its step
  times, bytes on the wire and, for lightning_compress configurations, the time spent inside the
  hook and inside its collectives.
* ``floor``: the compute-only baseline: the same model and per-rank batch in one process, no
  DDP, no process group, no communication.

Configuration labels:

* ``dense``: plain DDP allreduce (no hook);
* ``fp16``: ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook``;
* ``powersgd_r<R>``: PyTorch's ``powerSGD_hook`` with ``matrix_approximation_rank=R`` and
  ``start_powerSGD_iter=2`` (error feedback and warm start on, PyTorch's defaults);
* ``powersgd_r<R>_sync``: the same hook, waited for inside the hook (each bucket's P and Q
  allreduces finish before DDP hands over the next bucket). On gloo the plain hook issues the
  Q allreduce from a future callback (a gloo thread) while the backward pass issues the next
  bucket's collectives, so the ranks can enqueue collectives in different orders: gloo then
  aborts with "Received data size doesn't match expected size", or, where two mismatched
  tensors have the same size, silently sums the wrong tensors. Waiting keeps one order
  (lightning_compress's hook, too, finishes its exchange before it returns);
* ``compressor=...,...``: ``lightning_compress.register_compression(ddp, label)``;
* ``gravac:compressor=...,...``: the same, then ``lightning_compress.attach_gravac(state, **--gravac)``.

The process group is set up from the environment: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` (and ``GLOO_SOCKET_IFNAME``, which the harness sets to the namespace's device).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository's own package first (over an installed one).
# examples/digits_data.py brings the digits task without importing lightning_compress (and Lightning).
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from digits_data import accuracy as digits_accuracy  # noqa: E402
from digits_data import digits  # noqa: E402
from digits_data import make_mlp as digits_mlp  # noqa: E402

GRAVAC_PREFIX = "gravac:"
POWERSGD_PREFIX = "powersgd_r"
POWERSGD_START_ITER = 2


# ----- the communication-bound workloads ------------------------------------------------------------------
from _models import make_model, random_batches, steady_state  # noqa: E402


# ----- hooks ----------------------------------------------------------------------------------------------
class Meter:
    """Per-step counters filled by the instrumentation below."""

    def __init__(self) -> None:
        self.allreduce_bytes = 0  # bytes handed to dist.all_reduce by PyTorch's hooks

    def reset(self) -> None:
        self.allreduce_bytes = 0


METER = Meter()


def count_allreduce_bytes() -> None:
    """Count the input bytes of every ``dist.all_reduce`` (PyTorch's hooks call it through ``dist``)."""
    original = dist.all_reduce
    if getattr(original, "_counting", False):
        return

    def counting(tensor, *args, **kwargs):
        METER.allreduce_bytes += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    counting._counting = True
    dist.all_reduce = counting


def powersgd_rank(label: str) -> int:
    """The ``matrix_approximation_rank`` in ``powersgd_r<R>`` or ``powersgd_r<R>_sync``."""
    return int(label[len(POWERSGD_PREFIX):].removesuffix("_sync"))


def synchronous(hook):
    """``hook`` with its future waited for before returning (a completed future)."""

    def run(state, bucket):
        value = hook(state, bucket).wait()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(value)
        return done

    return run


def install(ddp: DistributedDataParallel, label: str, gravac: dict, samples_per_step: float, steady: bool = False):
    """Install the exchange named by ``label`` on ``ddp``; returns (kind, state, gravac run).

    ``steady``: our configurations without their default density warm-up (timed steps measure the
    steady state; GraVAC drops that warm-up itself)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if label == "dense":
        return "dense", None, None
    if label == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return "torch", None, None
    if label.startswith(POWERSGD_PREFIX):
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=powersgd_rank(label), start_powerSGD_iter=POWERSGD_START_ITER
        )
        hook = powerSGD_hook.powerSGD_hook
        ddp.register_comm_hook(state, synchronous(hook) if label.endswith("_sync") else hook)
        return "torch", state, None
    import lightning_compress

    text = label[len(GRAVAC_PREFIX):] if label.startswith(GRAVAC_PREFIX) else label
    state = lightning_compress.register_compression(ddp, steady_state(text) if steady else text)
    run = None
    if label.startswith(GRAVAC_PREFIX):
        run = lightning_compress.attach_gravac(state, **gravac)
        run.samples_per_step = samples_per_step
    return "ours", state, run


def attach_momentum(kind: str, state, optimizer) -> None:
    """Ours: the optimizer's momentum goes where the strategies and Accelerate's enable() put it by default."""
    if kind == "ours":
        from lightning_compress import attach_optimizer

        attach_optimizer(state, optimizer)


def powersgd_elements(model: nn.Module, rank: int) -> tuple[int, int]:
    """Elements PowerSGD allreduces per step: (P and Q of the compressed matrices, uncompressed rest).

    The hook views each gradient as ``shape[0] x rest`` (``n x m``), takes ``r = min(n, m, rank)``
    and compresses it when ``_should_compress`` (``n*m > 2 r (n+m)``, the default
    ``min_compression_rate=2``) says so: then ``P`` (``n x r``) and ``Q`` (``m x r``) are allreduced
    in fp32; every other tensor (biases) is allreduced densely.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    pq, rest = 0, 0
    for p in model.parameters():
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, rank)
        compress, _, _ = _should_compress(n, m, r, 2)
        if compress:
            pq += r * (n + m)
        else:
            rest += p.numel()
    return pq, rest


def wire_bytes_formula(model: nn.Module, label: str, world: int) -> float | None:
    """Bytes one rank sends per step for PyTorch's own exchanges, from the tensor sizes (ring allreduce)."""
    ring = 2.0 * (world - 1) / world
    numel = sum(p.numel() for p in model.parameters())
    if label == "dense":
        return 4.0 * numel * ring
    if label == "fp16":
        return 2.0 * numel * ring
    if label.startswith(POWERSGD_PREFIX):
        pq, rest = powersgd_elements(model, powersgd_rank(label))
        return 4.0 * (pq + rest) * ring
    return None


# ----- step mode ------------------------------------------------------------------------------------------
def choose_steps(estimate_s: float, args) -> int:
    """Timed steps: enough to fill ``--target-seconds``, within [--min-steps, --max-steps]."""
    k = math.ceil(args.target_seconds / max(estimate_s, 1e-3))
    return max(args.min_steps, min(args.max_steps, k))


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()  # the exchange runs in here (DDP)
    opt.step()


def step_mode(args, cfg: str, rank: int, world: int) -> dict:
    model = make_model(args.model, args.quick)
    numel = sum(p.numel() for p in model.parameters())
    batches = random_batches(model, args.batch, rank)
    if args.mode == "floor":
        net, kind, state, run = model, "floor", None, None
    else:
        net = DistributedDataParallel(model, gradient_as_bucket_view=args.bucket_view)
        kind, state, run = install(net, cfg, args.gravac, float(world * args.batch), steady=True)
        if kind == "torch":
            count_allreduce_bytes()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    attach_momentum(kind, state, opt)

    rows = []

    def one(i: int) -> None:
        x, y = batches[i % len(batches)]
        METER.reset()
        t0 = time.perf_counter()
        train_step(net, opt, x, y)
        seconds = time.perf_counter() - t0
        row = {"s": seconds}
        if kind == "ours":
            s = state.stats
            # Time in the exchange's own work (compress on the hook's thread, decode in callbacks)
            # and time the hook's thread was blocked on collectives (later passes, the step's drain).
            work = s.encode_seconds_last_step + s.decode_seconds_last_step
            row.update(sent=s.sent_bytes_last_step, handed=s.bytes_last_step, dense=s.dense_bytes_last_step,
                       across=getattr(s, "sent_bytes_across_nodes_last_step", s.sent_bytes_last_step),
                       hook_s=work + s.wait_seconds_last_step, comm_s=s.wait_seconds_last_step,
                       compressed=s.compressed_last_step)  # fmt: skip
            if run is not None:
                row["cf"] = run.last.get("cf", 1.0) if state.stats.compressed_last_step else 1.0
        elif kind == "torch":
            row.update(handed=METER.allreduce_bytes, sent=METER.allreduce_bytes * 2.0 * (world - 1) / world)
        rows.append(row)

    for i in range(args.warmup):
        one(i)
    estimate = rows[-1]["s"] if rows else 1.0
    if kind != "floor":
        t = torch.tensor([estimate], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank must run the same number of steps
        estimate = float(t.item())
        dist.barrier()
    steps = choose_steps(estimate, args)
    for i in range(steps):
        one(args.warmup + i)
    timed = rows[args.warmup:]
    out = {
        "kind": kind,
        "params": numel,
        "batch": args.batch,
        "warmup": args.warmup,
        "warmup_s": [r["s"] for r in rows[: args.warmup]],
        "steps": [r["s"] for r in timed],
        "median_s": statistics.median(r["s"] for r in timed),
        "wire_formula": wire_bytes_formula(model, cfg, world) if kind in ("dense", "torch") else None,
    }
    if kind in ("ours", "torch"):
        out["sent_per_step"] = statistics.fmean(r["sent"] for r in timed)
        out["handed_per_step"] = statistics.fmean(r["handed"] for r in timed)
    if kind == "ours":
        out["across_per_step"] = statistics.fmean(r["across"] for r in timed)  # by collectives that may cross nodes
        out["hook_s"] = [r["hook_s"] for r in timed]
        out["comm_s"] = [r["comm_s"] for r in timed]
        ratios = [r["dense"] * 2.0 * (world - 1) / world / r["sent"] for r in timed if r["sent"]]
        out["ratio"] = statistics.fmean(ratios) if ratios else None
        if run is not None:
            out["cf"] = [r["cf"] for r in timed]
    if kind == "dense":
        out["sent_per_step"] = out["wire_formula"]
    return out


# ----- digits mode ----------------------------------------------------------------------------------------
def digits_mode(args, cfg: str, rank: int, world: int) -> dict:
    """Train ``examples/ddp_digits.py``'s MLP on its data split with this exchange; final test accuracy."""
    from torch.utils.data import DataLoader, DistributedSampler

    train_set, test_set = digits(args.seed)
    model = digits_mlp(args.digits_hidden, args.seed)
    ddp = DistributedDataParallel(model)
    kind, state, run = install(ddp, cfg, args.gravac, float(world * args.digits_batch))
    if kind == "torch":
        count_allreduce_bytes()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.digits_batch, sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.digits_lr, momentum=0.9)
    attach_momentum(kind, state, opt)
    sent_total, steps, cfs, times = 0.0, 0, [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            METER.reset()
            t0 = time.perf_counter()
            train_step(ddp, opt, x, y)
            times.append(time.perf_counter() - t0)
            steps += 1
            if kind == "torch":
                sent_total += METER.allreduce_bytes * 2.0 * (world - 1) / world
            if run is not None:
                cfs.append(run.last.get("cf", 1.0) if state.stats.compressed_last_step else 1.0)
    if kind == "dense":
        sent_total = steps * wire_bytes_formula(model, "dense", world)
    elif kind == "ours":
        sent_total = state.stats.sent_bytes_total
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    finite = bool(torch.isfinite(flat).all())
    same = torch.tensor([1 if finite else 0], dtype=torch.int64)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    acc = digits_accuracy(model, test_set) if same.item() else float("nan")
    out = {"accuracy": acc, "steps": steps, "sent_total": sent_total, "diverged": not bool(same.item()),
           "ms_per_step": 1000.0 * statistics.median(times[10:] or times)}  # fmt: skip
    if cfs:
        out["cf"] = cfs
    return out


# ----- time-to-accuracy mode ------------------------------------------------------------------------------
def wide_mlp(seed: int) -> nn.Module:
    """64 -> 2560 -> 2048 -> 10 (5.41M parameters): digits with a model whose exchange costs time at 1 Gbit/s."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 2560), nn.ReLU(), nn.Linear(2560, 2048), nn.ReLU(), nn.Linear(2048, 10))


def tta_mode(args, cfg: str, rank: int, world: int) -> dict:
    """Train the wide MLP on digits until the test accuracy reaches ``--target``: the training seconds it took.

    The clock counts training steps only (the test accuracy, every ``--eval-every`` steps, is not
    counted); every rank holds the same weights, so every rank stops at the same step.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    train_set, test_set = digits(args.seed)
    model = wide_mlp(args.seed)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.digits_lr, momentum=0.9)
    kind, state, _ = install(ddp, cfg, args.gravac, float(world * args.digits_batch))
    attach_momentum(kind, state, opt)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.digits_batch, sampler=sampler)
    clock, steps, curve, reached = 0.0, 0, [], None
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            t0 = time.perf_counter()
            train_step(ddp, opt, x, y)
            clock += time.perf_counter() - t0
            steps += 1
            if steps % args.eval_every == 0:
                acc = digits_accuracy(model, test_set)
                curve.append((steps, clock, acc))
                if acc >= args.target:
                    reached = (steps, clock)
                    break
        if reached:
            break
    sent = state.stats.sent_bytes_total if kind == "ours" else None
    return {"target": args.target, "reached": reached is not None, "steps": reached[0] if reached else steps,
            "seconds": reached[1] if reached else clock, "curve": curve, "sent_total": sent,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


# ----- main -----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("step", "floor", "tta"), default="step")
    p.add_argument("--config", action="append", default=None,
                   help="configuration label; repeat to run several, one after the other, in this process group")
    p.add_argument("--gravac", default="{}", help="JSON dict of attach_gravac keyword arguments")
    p.add_argument("--out", required=True, help="JSON file this rank writes (rewritten after every configuration)")
    p.add_argument("--quick", action="store_true", help="small model (0.4M parameters)")
    p.add_argument("--model", default="mlp", choices=("mlp", "blocks"), help="workload of the step mode (see _models)")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch of the MLP")
    p.add_argument("--bucket-view", action="store_true", help="step mode: DDP with gradient_as_bucket_view=True")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--target-seconds", type=float, default=20.0, help="time the timed steps should take")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--digits", action="store_true", help="also train digits with each exchange")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--digits-batch", type=int, default=32)
    p.add_argument("--digits-lr", type=float, default=0.05)
    p.add_argument("--digits-hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.95, help="tta: test accuracy to reach")
    p.add_argument("--eval-every", type=int, default=4, help="tta: steps between test accuracy checks")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    args = p.parse_args(argv)
    args.gravac = json.loads(args.gravac)
    args.config = args.config or (["floor"] if args.mode == "floor" else ["dense"])
    return args


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # the harness reads it while this rank runs


def main(argv=None) -> int:
    """Run each configuration in turn; stop at the first one that fails (the group may be broken)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result: dict = {"rank": rank, "world": world, "mode": args.mode, "runs": {}}
    if args.mode in ("step", "tta"):
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))  # fmt: skip
    code = 0
    try:
        for cfg in args.config:
            t0 = time.perf_counter()
            rec: dict = {}
            parts = (("tta", tta_mode),) if args.mode == "tta" else (("step", step_mode), ("digits", digits_mode))
            for part, fn in parts:
                if part == "digits" and not (args.digits and args.mode == "step"):
                    continue
                try:
                    rec[part] = fn(args, cfg, rank, world)
                except Exception as err:  # recorded, not hidden: the harness puts it in the table
                    rec[part] = {"error": f"{type(err).__name__}: {err}".strip(), "traceback": traceback.format_exc()}
                    code = 1
                    break
            rec["wall_s"] = time.perf_counter() - t0
            result["runs"][cfg] = rec
            write_json(args.out, result)
            gc.collect()
            if code:
                break
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
