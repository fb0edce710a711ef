"""Scale study: bytes and step time on 2, 4 and 8 gloo ranks here, and a cost model to 1024 ranks.

1. **Measured** (``N`` gloo ranks on 127.0.0.1, one thread each, one launch per configuration and
   ``N``, killed at a deadline): scale_bytes.py's 6.3M-parameter MLP (1024-2048-1024-2048, batch 32
   per rank of random data, SGD) with DDP and each configuration; per step the slowest rank's time,
   the bytes each rank transmits counted from the collectives it issues (scale_bytes.py's
   ``Counter``, and a log of every collective: kind, group size, input bytes, whether its group
   spans two (simulated) nodes), and the library's own count. Every launch first times the
   compute-only step (same model and batch, no DDP, no communication) with its ``N`` ranks at once
   and with rank 0 alone: on 2 cores 4 and 8 ranks are oversubscribed, and the ratio of the two,
   measured at that moment's load, is how much the ranks stretch each other's CPU work.
2. **Per-element costs** (one process, one thread): the hook's compressor calls (``encode_batch``
   with the residual, ``decode_batch`` of 1 and 8 payloads, a new seed every call), on one tensor of
   2M elements and on 2048 pieces of it, timed as medians, as seconds per element and per call;
   PowerSGD's own exchange on one rank for a 1024 x 2048 matrix; ``y += x``. ``--gpu-costs FILE`` (the same
   JSON shape as ``costs`` in the output) adds a GPU variant of the extrapolation.
3. **Model** (``_scale_model.py``): collectives per bucket as the library issues them, alpha +
   bytes / bandwidth per message, compression from the per-element costs, no overlap.
4. **Validation**: alpha from a one-element allreduce timed in the dense launches, the loopback's
   bandwidth fitted on the dense steps at N = 2, 4, 8, then every configuration's step predicted
   and compared with the measurement.
5. **Extrapolation**: ResNet-50, BERT-base and the MLP on 2 ... 1024 ranks, 8 per node, nodes joined
   by 10 or 100 Gbit/s, flat and hierarchical.

    python benchmarks/scale_study.py [--worlds 2,4,8] [--configs "dense;compressor=sign,feedback=ef;..."]
                                     [--steps 10] [--gpu-costs FILE] [--out-dir benchmarks/results]
    python benchmarks/scale_study.py --quick                 # 2 ranks, small model, a temp dir
    python benchmarks/scale_study.py --from-json benchmarks/results/scale_study.json   # re-render
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import _scale_model as sm  # noqa: E402

from _machine import cpu_model, free_port  # noqa: E402
from _models import random_batches, steady_state  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDTHS = (1024, 2048, 1024, 2048)  # scale_bytes.py's MLP
QUICK_WIDTHS = (256, 512, 256, 512)
CONFIGS = (
    "dense",
    "compressor=fp16,feedback=none",
    "compressor=sign,feedback=ef,transport=allgather",
    "compressor=sign,feedback=ef,transport=two_pass",
    "compressor=topk,density=0.01,feedback=ef,transport=allgather",
    "compressor=topk,density=0.01,feedback=ef,transport=two_pass",
    "compressor=sign,feedback=doublesqueeze",
    "compressor=randk,density=0.01,feedback=diana,transport=allreduce",
    "compressor=powersgd,powersgd_rank=4,feedback=ef",
    "compressor=topk,density=0.01,feedback=ef,transport=two_pass,hierarchical=true,ranks_per_node=2",
    "compressor=sign,feedback=ef,hierarchical=true,ranks_per_node=2",
)
QUICK_CONFIGS = (CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[5], CONFIGS[8], CONFIGS[9])
SHORT = {
    "dense": "dense",
    "compressor=fp16,feedback=none": "fp16",
    "compressor=sign,feedback=ef,transport=allgather": "sign+EF allgather",
    "compressor=sign,feedback=ef,transport=two_pass": "sign+EF two_pass",
    "compressor=topk,density=0.01,feedback=ef,transport=allgather": "top-k 1%+EF allgather",
    "compressor=topk,density=0.01,feedback=ef,transport=two_pass": "top-k 1%+EF two_pass",
    "compressor=sign,feedback=doublesqueeze": "sign+DoubleSqueeze",
    "compressor=randk,density=0.01,feedback=diana,transport=allreduce": "rand-k 1%+DIANA allreduce",
    "compressor=powersgd,powersgd_rank=4,feedback=ef": "PowerSGD r4+EF",
    "compressor=topk,density=0.01,feedback=ef,transport=two_pass,hierarchical=true,ranks_per_node=2":
        "top-k 1%+EF two_pass, hierarchical L=2",
    "compressor=sign,feedback=ef,hierarchical=true,ranks_per_node=2": "sign+EF auto, hierarchical L=2",
}  # fmt: skip

# The extrapolated schemes: (label, scheme, library config string or None for DDP's dense)
# A scheme of the model that the library does not run (none now: beyond 8 ranks the library sums the small
# tensors by allreduce, the variant this once showed); kept so that one can be added back to the tables.
VARIANT = "sign+EF two_pass, small tensors by allreduce (not the library)"
EXTRAPOLATED = (
    ("dense", sm.Scheme(), None),
    ("fp16", sm.Scheme("fp16", "allreduce", "none"), "compressor=fp16,feedback=none"),
    ("PowerSGD r4+EF", sm.Scheme("powersgd", "powersgd", "ef", rank=4), "compressor=powersgd,powersgd_rank=4,feedback=ef"),
    ("sign+EF allgather", sm.Scheme("sign", "allgather", "ef"), "compressor=sign,feedback=ef,transport=allgather"),
    ("sign+EF two_pass", sm.Scheme("sign", "two_pass", "ef"), "compressor=sign,feedback=ef,transport=two_pass"),
    ("top-k 1%+EF allgather", sm.Scheme("topk", "allgather", "ef"),
     "compressor=topk,density=0.01,feedback=ef,transport=allgather"),
    ("top-k 1%+EF two_pass", sm.Scheme("topk", "two_pass", "ef"),
     "compressor=topk,density=0.01,feedback=ef,transport=two_pass"),
    ("sign+DoubleSqueeze", sm.Scheme("sign", "two_pass", "doublesqueeze", block_size=256), "compressor=sign,feedback=doublesqueeze"),
    ("rand-k 1%+DIANA allreduce", sm.Scheme("randk", "allreduce", "diana"),
     "compressor=randk,density=0.01,feedback=diana,transport=allreduce"),
)  # fmt: skip
PLOTTED = ("dense", "fp16", "PowerSGD r4+EF", "sign+EF two_pass", "top-k 1%+EF allgather", "top-k 1%+EF two_pass",
           "rand-k 1%+DIANA allreduce")  # fmt: skip
MODELS = {
    "resnet50": ("ResNet-50 (25.6M parameters, 161 tensors)", sm.resnet50_shapes),
    "bert_base": ("BERT-base (109.5M parameters, 199 tensors)", sm.bert_base_shapes),
    "mlp": ("the measured MLP (6.3M parameters, 6 tensors)", lambda: sm.mlp_shapes(WIDTHS)),
}
EXTRA_WORLDS = tuple(2**k for k in range(1, 11))
# Stated assumptions of the extrapolation (not measured here).
INTRA = {"alpha_s": 5e-6, "bandwidth_Bps": 100e9}  # an NVLink-class link inside a node, per rank and direction
INTER_ALPHA_S = 20e-6  # latency per message between nodes
RANKS_PER_NODE = 8


# ----- per-element costs (this process, one thread) --------------------------------------------------
def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _codec_costs(comp, ef: bool, n: int, pieces: int, repeats: int) -> dict:
    from lightning_compress.transport import Layout

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    res = torch.randn(n, generator=gen) * 0.1 if ef else None
    out = torch.empty(n) if ef else None

    def cut(t, k):
        return list(t.split(-(-n // k))) if t is not None else [None] * len(x.split(-(-n // k)))

    counter = iter(range(1, 1 << 30))  # a new seed every call, as every step of the hook has (no cache hits)

    def encoder(k):
        parts = cut(x, k)
        layout = Layout.of(comp, [p.numel() for p in parts])
        wire = torch.zeros(layout.total, dtype=comp.payload_dtype)

        def fn():
            seeds = [next(counter) for _ in parts]
            comp.encode_batch(parts, cut(res, k), cut(out, k), wire, layout.offsets, seeds=seeds)

        return fn, wire, layout, [p.numel() for p in parts]

    enc1, wire1, lay1, sizes1 = encoder(1)
    enc_k, wire_k, lay_k, sizes_k = encoder(pieces)
    t_enc1, t_enc_k = _median_s(enc1, repeats), _median_s(enc_k, repeats)

    def decoder(wires, layout, sizes):
        outs = [torch.empty(m) for m in sizes]
        return lambda: comp.decode_batch(wires, layout.offsets, outs, [next(counter) for _ in sizes])

    t_dec1 = _median_s(decoder([wire1], lay1, sizes1), repeats)
    t_dec8 = _median_s(decoder([wire1] * 8, lay1, sizes1), repeats)
    t_dec_k = _median_s(decoder([wire_k], lay_k, sizes_k), repeats)
    encode_call = max(0.0, (t_enc_k - t_enc1) / (pieces - 1))
    decode_call = max(0.0, (t_dec_k - t_dec1) / (pieces - 1))
    decode = max(0.0, (t_dec8 - t_dec1) / (7 * n))
    return {
        "encode": max(0.0, t_enc1 - encode_call) / n, "encode_call": encode_call,
        "decode": decode, "decode_out": max(0.0, (t_dec1 - decode_call) / n - decode), "decode_call": decode_call,
        "raw_ms": {"encode_1": 1e3 * t_enc1, f"encode_{pieces}": 1e3 * t_enc_k, "decode_1x1": 1e3 * t_dec1,
                   "decode_1x8": 1e3 * t_dec8, f"decode_{pieces}x1": 1e3 * t_dec_k},
    }  # fmt: skip


def _powersgd_costs(rank: int, repeats: int) -> dict:
    """PowerSGD's work per matrix element: the library's exchange (``PowerSGDTransport``: ``M = x + e``,
    ``M Q``, orthonormalize, ``M^T P``, the error, ``P Q^T``) on one rank, whose allreduces are no-ops,
    on a 1024 x 2048 and a 64 x 512 matrix (the difference: per element; the small one: per call).
    Without the library's PowerSGD the same steps in torch."""
    try:
        from lightning_compress.collectives import Collectives
        from lightning_compress.compressors import COMPRESSORS
        from lightning_compress.compressors.powersgd import initial_factor
        from lightning_compress.powersgd import PowerSGDTransport
        from lightning_compress.transport import Batch
    except ImportError:
        PowerSGDTransport = None
    times = {}
    for n, m in ((1024, 2048), (64, 512)):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n * m, generator=gen)
        res, err, out = torch.randn(n * m, generator=gen) * 0.1, torch.empty(n * m), torch.empty(n * m)
        if PowerSGDTransport is not None:
            comp = COMPRESSORS["powersgd"](rank=rank)
            q0, q_out = initial_factor(m, rank, 1, x.device), torch.empty(m, rank)

            def step(comp=comp, x=x, res=res, err=err, out=out, n=n, m=m, q0=q0, q_out=q_out):
                batch = Batch(comp, [n * m], [out], lambda t, j: 1, x.device)
                t = PowerSGDTransport(Collectives(None, 1, 0), batch, shapes=[(n, m)], factors=[q0], factors_out=[q_out])
                wire = t.new_wire()
                t.encode(wire, [x], [res], [err], 1.0)
                t.launch(wire)
                t.launch_second()
                t.finish()
        else:
            q0 = torch.randn(m, rank, generator=gen)

            def step(x=x, res=res, err=err, out=out, n=n, m=m, q0=q0):
                mat = torch.add(res, x, out=err).view(n, m)
                p, _ = torch.linalg.qr(mat @ q0)
                q = mat.t() @ p
                mat.addmm_(p, q.t(), alpha=-1.0)
                torch.mm(p, q.t(), out=out.view(n, m))

        times[(n, m)] = _median_s(step, repeats)
    big, small = 1024 * 2048, 64 * 512
    t_big, t_small = times[(1024, 2048)], times[(64, 512)]
    per = max(0.0, (t_big - t_small) / (big - small))
    return {"encode": per, "encode_call": max(0.0, t_small - per * small), "decode": 0.0, "decode_out": 0.0,
            "decode_call": 0.0, "source": "lightning_compress PowerSGDTransport on one rank (encode, both passes, finish)"
            if PowerSGDTransport is not None else "torch ops (the library had no PowerSGD)",
            "raw_ms": {"exchange_1024x2048": 1e3 * t_big, "exchange_64x512": 1e3 * t_small}}  # fmt: skip


def measure_costs(repeats: int, n: int = 1 << 21, pieces: int = 2048) -> dict:
    """Seconds per element (and per call) of every compressor's encode and decode, here, one thread."""
    from lightning_compress import CompressionConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    try:
        costs = {}
        for key, cfg in (("sign", "compressor=sign,feedback=ef"), ("topk_0.01", "compressor=topk,density=0.01,feedback=ef"),
                         ("randk_0.01", "compressor=randk,density=0.01,feedback=diana"),
                         ("fp16", "compressor=fp16,feedback=none")):  # fmt: skip
            comp = CompressionConfig.from_string(cfg).make_compressor()
            costs[key] = _codec_costs(comp, cfg.endswith("feedback=ef"), n, pieces, repeats)
        costs["powersgd_r4"] = _powersgd_costs(4, repeats)
        a, b = torch.randn(n), torch.randn(n)
        costs["add"] = _median_s(lambda: a.add_(b), repeats) / n
        return costs
    finally:
        torch.set_num_threads(threads)


def lower_costs(a: dict, b: dict) -> dict:
    """Per entry the lower of two measurements (the one the machine's other load disturbed less)."""
    out = {}
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, dict):
            out[key] = {k: (min(v, vb[k]) if isinstance(v, float) else v) for k, v in va.items()}
        else:
            out[key] = min(va, vb)
    return out


# ----- the ranks ----------------------------------------------------------------------------------
_KIND = {"all_reduce": "allreduce", "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
         "all_to_all_single": "all_to_all", "reduce_scatter_tensor": "reduce_scatter", "all_gather": "all_gather",
         "reduce_scatter": "reduce_scatter", "broadcast": "broadcast"}  # fmt: skip
# (input argument: position, keyword), (group: position, keyword)
_ARGS = {"all_reduce": ((0, "tensor"), (2, "group")), "all_gather_into_tensor": ((1, "input_tensor"), (2, "group")),
         "all_gather_single": ((1, "input_tensor"), (2, "group")), "all_to_all_single": ((1, "input"), (4, "group")),
         "reduce_scatter_tensor": ((1, "input"), (3, "group")), "all_gather": ((1, "tensor"), (2, "group")),
         "reduce_scatter": ((1, "input_list"), (3, "group")), "broadcast": ((0, "tensor"), (2, "group"))}  # fmt: skip


def _arg(args, kwargs, where):
    pos, name = where
    return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)


def _nbytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return value.numel() * value.element_size() if value is not None else 0


class CollectiveLog:
    """Every collective issued while ``on``: (kind, group size, input bytes, spans two nodes).

    Installed over scale_bytes.py's ``Counter`` (which counts the step's bytes with the world's
    size), and rebinds the library's own aliases of the collectives; ``per_node`` decides which
    groups span (simulated) nodes.
    """

    def __init__(self, per_node: int) -> None:
        self.calls: list[tuple[str, int, int, bool]] = []
        self.on = False
        self.per_node = per_node
        self.originals: dict[str, object] = {}

    def install(self, originals: dict) -> None:
        world = dist.get_world_size()
        for name, kind in _KIND.items():
            current = getattr(dist, name, None)
            if current is None:
                continue
            where_in, where_group = _ARGS[name]

            def logged(*args, _current=current, _kind=kind, _in=where_in, _group=where_group, **kwargs):
                if self.on:
                    group = _arg(args, kwargs, _group)
                    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
                    nodes = {r // self.per_node for r in ranks}
                    self.calls.append((_kind, len(ranks), _nbytes(_arg(args, kwargs, _in)), len(nodes) > 1))
                return _current(*args, **kwargs)

            setattr(dist, name, logged)
            self.originals[name] = logged
            for old in {current, originals.get(name)} - {None}:
                _rebind(old, logged)

    def sent(self) -> float:
        return sum(sm.sent_bytes(sm.Op(k, g, b)) for k, g, b, _ in self.calls if k in sm.KINDS)

    def across(self) -> float:
        return sum(sm.sent_bytes(sm.Op(k, g, b)) for k, g, b, x in self.calls if k in sm.KINDS and x)


def _rebind(old, new) -> None:
    """The library's modules that hold ``old`` (a collective bound at import) get ``new``."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("lightning_compress"):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)


def _model(widths) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _rank_main(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=job["collective_timeout"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    warnings.simplefilter("ignore", UserWarning)
    try:
        result = _run(rank, world, job)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(rank: int, world: int, job: dict) -> dict:
    from scale_bytes import Counter
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    import lightning_compress  # noqa: F401  (its modules, for the rebinding below)
    from lightning_compress import register_compression

    torch.manual_seed(0)
    model = _model(job["widths"])
    batches = random_batches(model, job["batch"], rank, count=2)
    cfg = job["config"]
    per_node = int(dict(p.split("=", 1) for p in cfg.split(",") if "=" in p).get("ranks_per_node", world))
    originals = {name: getattr(dist, name, None) for name in _KIND}
    counter = Counter()
    counter.install()
    log = CollectiveLog(per_node)
    log.install(originals)
    # The baselines of this launch, at this moment's load: the compute-only step with every rank at
    # once, and with rank 0 alone (the others wait at the barrier); no DDP, no communication.
    plain = _model(job["widths"])
    plain.load_state_dict(model.state_dict())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    compute = {}
    for mode in ("all", "alone"):
        compute[mode] = []
        for step in range(job["warmup"] + job["steps"]):
            x, y = batches[step % 2]
            dist.barrier()
            if mode == "alone" and rank != 0:
                continue
            t0 = time.perf_counter()
            plain_opt.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            plain_opt.step()
            if step >= job["warmup"]:
                compute[mode].append(time.perf_counter() - t0)
    del plain, plain_opt
    state = None
    if cfg == "compute":
        net, params = model, model.parameters()
    else:
        net = DistributedDataParallel(model)
        if cfg == "dense":  # PyTorch's allreduce hook: DDP's own average, through dist.all_reduce
            net.register_comm_hook(None, default_hooks.allreduce_hook)
        else:
            state = register_compression(net, steady_state(cfg))
            for name, fn in log.originals.items():  # modules imported by the registration
                _rebind(originals.get(name), fn)
        params = net.parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    times, sent, counted, own, across, hook = [], [], [], [], [], []
    for step in range(job["warmup"] + job["steps"]):
        x, y = batches[step % 2]
        dist.barrier()
        timed = step >= job["warmup"]
        log.calls, log.on = [], timed
        counter.sent, counter.on = 0.0, timed
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        log.on = counter.on = False
        if timed:
            times.append(elapsed)
            sent.append(log.sent())
            across.append(log.across())
            counted.append(counter.sent)
            if state is not None:
                s = state.stats
                own.append(s.sent_bytes_last_step)
                hook.append([s.encode_seconds_last_step, s.decode_seconds_last_step, s.wait_seconds_last_step])
    probe = []
    if cfg == "dense":  # the latency of one collective: an allreduce of one element, 2(N-1) ring messages
        one = torch.zeros(1)
        for _ in range(job["steps"] + 3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(one)
            probe.append(time.perf_counter() - t0)
        probe = probe[3:]
    return {
        "rank": rank, "step_s": times, "probe_s": probe, "compute_all_s": compute["all"], "compute_alone_s": compute["alone"], "sent": sent, "counted": counted, "own": own, "across": across,
        "hook_s": hook, "collectives": log.calls,
        "transport": getattr(state, "transport", None) if state is not None else ("allreduce" if cfg == "dense" else None),
        "hierarchy": repr(getattr(state, "hierarchy", None)) if state is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip


def launch(world: int, job: dict, deadline_s: float) -> dict:
    """``job`` on ``world`` gloo ranks; the ranks are killed past ``deadline_s``. Rank results, or an error."""
    with tempfile.TemporaryDirectory(prefix="scale_study_") as tmp:
        ctx = mp.start_processes(_rank_main, args=(world, free_port(), job, tmp), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    for p in ctx.processes:
                        p.join(10)
                    return {"error": f"killed at the deadline ({deadline_s:.0f} s)"}
        except Exception as exc:  # a rank raised or died: the others are ended by the context
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            return {"error": " ".join(str(exc).split())[-400:]}
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    return summarise(ranks)


def summarise(ranks: list[dict]) -> dict:
    def slowest(field):
        return [max(r[field][i] for r in ranks) for i in range(len(ranks[0][field]))]

    steps, compute = slowest("step_s"), slowest("compute_all_s")
    r0 = ranks[0]
    alone = statistics.median(r0["compute_alone_s"])
    out = {
        "step_ms": 1e3 * statistics.median(steps), "steps_ms": [1e3 * s for s in steps],
        "compute_ms": 1e3 * statistics.median(compute), "compute_alone_ms": 1e3 * alone,
        "stretch": statistics.median(compute) / alone,
        "sent": max(r0["sent"]), "counted": max(r0["counted"]), "across": max(max(r["across"]) for r in ranks),
        "own": max(r0["own"]) if r0["own"] else None, "transport": r0["transport"], "hierarchy": r0["hierarchy"],
        "collectives": r0["collectives"], "params": r0["params"],
    }  # fmt: skip
    if r0["probe_s"]:
        out["probe_ms"] = 1e3 * statistics.median(max(r["probe_s"][i] for r in ranks) for i in range(len(r0["probe_s"])))
    if r0["hook_s"]:
        out["hook_ms"] = [1e3 * statistics.median(h[i] for h in r0["hook_s"]) for i in range(3)]
    return out


def available(cfg: str) -> str | None:
    """``None`` when the library builds ``cfg``, else why not."""
    if cfg == "dense":
        return None
    from lightning_compress import CompressionConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CompressionConfig.from_string(cfg)
    except (ValueError, TypeError) as exc:
        return str(exc).split(";")[0]
    return None


def measure(args, configs: list[str], widths) -> dict:
    runs: dict = {}
    start = time.time()
    for world in args.worlds:
        base = {"widths": list(widths), "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                "collective_timeout": min(args.deadline, 300)}  # fmt: skip
        row = runs.setdefault(str(world), {})
        for cfg in configs:
            result = row[cfg] = launch(world, {**base, "config": cfg}, args.deadline)
            shown = result.get("error") or (f"{result['step_ms']:8.1f} ms  {result['sent'] / 1e6:7.3f} MB  compute "
                                            f"{result['compute_ms']:.0f} ms, x{result['stretch']:.2f} alone")  # fmt: skip
            print(f"  N={world} {SHORT.get(cfg, cfg):42s} {shown}  ({time.time() - start:.0f} s)", flush=True)
    return runs


# ----- validation and extrapolation ----------------------------------------------------------------
def _baseline(runs: dict, world: int, field: str) -> float:
    """The median over ``world``'s launches of their own compute-only baseline (``compute_ms`` or ``stretch``)."""
    values = [r[field] for r in runs[str(world)].values() if field in r]
    return statistics.median(values) if values else math.nan


def compute_ms(runs: dict, world: int) -> float:
    return _baseline(runs, world, "compute_ms")


def validate(runs: dict, costs: dict, configs: list[str], widths, cores: int) -> dict:
    shapes = sm.mlp_shapes(widths)
    worlds = sorted(int(w) for w in runs)
    points = []
    for w in worlds:
        dense = runs[str(w)].get("dense", {})
        if "step_ms" not in dense:
            continue
        ops = sm.step_ops(sm.Scheme(), shapes, w)
        scaled = sum(sm.sent_bytes(op) for op in ops) * dense["stretch"]
        comm = max(0.0, dense["step_ms"] - dense["compute_ms"]) / 1e3
        points.append((w, sum(sm.steps(op) for op in ops), scaled, comm))
    probes = [(w, runs[str(w)]["dense"]["probe_ms"] / 1e3 / (2 * (w - 1))) for w in worlds
              if "probe_ms" in runs[str(w)].get("dense", {}) and w > 1]  # fmt: skip
    if probes:  # alpha: the median latency per ring message of the probes; B: least squares on what is left
        alpha = statistics.median(a for _, a in probes)
        rest = [(b, t - alpha * m) for _, m, b, t in points]
        inv = sum(b * t for b, t in rest) / sum(b * b for b, _ in rest) if rest else 0.0
        bandwidth = 1.0 / inv if inv > 0 else math.inf
    else:  # no probe (an older json): both from the steps
        alpha, bandwidth = sm.fit_loopback([p[1:] for p in points]) if points else (0.0, math.inf)
    rows = []
    for cfg in configs:
        for w in worlds:
            got = runs[str(w)].get(cfg, {})
            measured = "step_ms" in got
            compute = got["compute_ms"] if measured else compute_ms(runs, w)
            stretch = got["stretch"] if measured else _baseline(runs, w, "stretch")
            scheme = sm.scheme_from_config(cfg, w)
            pred = sm.loopback_step(scheme, shapes, w, compute / 1e3, alpha, bandwidth, stretch, costs)
            ops = sm.step_ops(scheme, shapes, w)
            row = {"config": cfg, "world": w, "predicted_ms": 1e3 * pred["step_s"], "stretch": stretch,
                   "stretch_idle": max(1.0, w / cores), "predicted_comm_ms": 1e3 * pred["comm_s"],
                   "predicted_compress_ms": 1e3 * pred["compress_s"], "compute_ms": compute,
                   "model_sent": pred["sent_bytes"], "model_collectives": len(ops),
                   "model_kinds": _kinds([(op.kind, op.group, op.nbytes) for op in ops])}  # fmt: skip
            if measured:
                row.update(measured_ms=got["step_ms"], ratio=got["step_ms"] / (1e3 * pred["step_s"]),
                           measured_sent=got["sent"], measured_collectives=len(got["collectives"]),
                           measured_kinds=_kinds([(k, g, b) for k, g, b, _ in got["collectives"]]))  # fmt: skip
                if got.get("hook_ms"):  # the hook's own encode + decode (wall, rank 0) in place of the cost model's
                    hook = sum(got["hook_ms"][:2])
                    row.update(hook_ms=hook, ratio_with_hook=got["step_ms"] / (compute + 1e3 * pred["comm_s"] + hook))
            else:
                row["error"] = got.get("error", "not measured")
            rows.append(row)
    return {"alpha_s": alpha, "bandwidth_Bps": bandwidth, "cores": cores, "rows": rows,
            "alpha_probes": [{"world": w, "alpha_s": a} for w, a in probes],
            "dense_fit": [{"world": w, "messages": m, "scaled_bytes": b, "comm_ms": 1e3 * t,
                           "fitted_ms": 1e3 * (m * alpha + b / bandwidth)} for w, m, b, t in points]}  # fmt: skip


def _kinds(calls) -> dict:
    """``{kind: count}`` of a step's collectives (their group sizes beside, when not all alike)."""
    out: dict = {}
    for kind, group, _ in calls:
        key = f"{kind}/{group}"
        out[key] = out.get(key, 0) + 1
    return out


def accepted(cfg: str | None, hierarchical: bool) -> bool:
    """The library builds ``cfg`` (hierarchically); DDP's dense (``None``) is modelled either way."""
    if cfg is None:
        return True
    text = cfg + (f",hierarchical=true,ranks_per_node={RANKS_PER_NODE}" if hierarchical else "")
    return available(text) is None


def extrapolate(costs_by_device: dict, gbits=(10, 100)) -> dict:
    """``{"model|gbit|label|flat or hier|device[|log]": [point per N]}``; ``|log``: the latency-optimal
    variant (ResNet-50 only). Recomputed from the saved measurements on ``--from-json``."""
    out: dict = {}
    intra = sm.Link(INTRA["alpha_s"], INTRA["bandwidth_Bps"])
    accepts = {(cfg, hier): accepted(cfg, hier) for _, _, cfg in EXTRAPOLATED for hier in (False, True)}
    for model, (_, shapes_fn) in MODELS.items():
        shapes = shapes_fn()
        for gbit, latency in ((g, lat) for g in gbits for lat in ("ring", "log")):
            cluster = sm.Cluster(intra, sm.Link(INTER_ALPHA_S, gbit * sm.GBIT), RANKS_PER_NODE, latency)
            for label, scheme, cfg in EXTRAPOLATED:
                for hier in (False, True):
                    if not accepts[(cfg, hier)]:
                        continue  # the library refuses it: no line
                    s = replace(scheme, hierarchical=hier, ranks_per_node=RANKS_PER_NODE)
                    for device, costs in costs_by_device.items():
                        if latency == "log" and model != "resnet50":
                            continue
                        key = f"{model}|{gbit}|{label}|{'hier' if hier else 'flat'}|{device}"
                        key += "|log" if latency == "log" else ""
                        out[key] = [_rounded(dict(world=w, **sm.exchange(s, shapes, w, cluster, costs)))
                                    for w in EXTRA_WORLDS]  # fmt: skip
    return out


def _rounded(point: dict) -> dict:
    return {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in point.items()}


# ----- report ------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 1 else f"{x:.2f}")


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def report(data: dict) -> str:
    meta, runs, val, costs = data["meta"], data["runs"], data["validation"], data["costs"]
    worlds = sorted(int(w) for w in runs)
    configs = data["configs"]
    lines = [
        "# Scale study: measured on 2, 4 and 8 ranks, modelled to 1024",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}` ({meta['wall_min']:.1f} min, {meta['date']}).",
        f"Library: commit {meta.get('git', '?')}."
        + (f" This page, the plot and the model's tables were rendered from the run's json by `{meta['rendered']}`."
           if meta.get("rendered") else ""),
        f"Load average at start {meta['load_start']}, at end {meta['load_end']} (a shared machine: every figure is a "
        "median, and the model is calibrated on dense runs of the same session).",
        "",
        "## Measured",
        "",
        f"Model: an MLP {'-'.join(map(str, meta['widths']))} ({sum(map(sm.numel, sm.mlp_shapes(meta['widths'])))} "
        f"parameters), batch {meta['batch']} per rank of random data, cross-entropy, SGD; {meta['warmup']} warm-up steps, "
        f"then {meta['steps']} timed steps, each after a barrier; a step's time is the slowest rank's, the cell the median. "
        "Every launch first times the compute-only step (the same model and batch, no DDP) with all its ranks at once and "
        "with rank 0 alone: its own baseline at that moment's load; the first row gives their medians over the launches. "
        "Bytes: what one rank transmits per step, counted from the collectives it issued (ring allreduce 2(g-1)/g of its "
        "input, all_gather g-1 times, all_to_all and reduce-scatter (g-1)/g, g the collective's group), the model's count "
        "in brackets. Collectives: how many per step, measured [model].",
        "",
        "| configuration | " + " | ".join(f"N={w} ms (x dense) | MB/rank | collectives" for w in worlds) + " |",
        "|---|" + "---:|---:|---:|" * len(worlds),
    ]
    by = {(r["config"], r["world"]): r for r in val["rows"]}
    lines.append("| compute only, N processes at once (x one alone) | " + " | ".join(
        f"{compute_ms(runs, w):.0f} (x{_baseline(runs, w, 'stretch'):.1f}) | 0 | 0" for w in worlds) + " |")  # fmt: skip
    for cfg in configs:
        cells = []
        for w in worlds:
            got, row = runs[str(w)].get(cfg, {}), by.get((cfg, w), {})
            if "step_ms" not in got:
                cells.append(f"{got.get('error', 'not run')[:60]} | | ")
                continue
            dense = runs[str(w)].get("dense", {}).get("step_ms")
            rel = f" ({got['step_ms'] / dense:.2f})" if dense else ""
            cells.append(f"{got['step_ms']:.0f}{rel} | {_mb(got['sent'])} [{_mb(row['model_sent'])}] | "
                         f"{len(got['collectives'])} [{row['model_collectives']}]")  # fmt: skip
        lines.append(f"| `{cfg}` | " + " | ".join(cells) + " |")
    lines += ["", "Transport, and what crossed (simulated) nodes, per configuration (rank 0):", ""]
    for cfg in configs:
        got = [runs[str(w)].get(cfg, {}) for w in worlds]
        desc = ", ".join(f"N={w}: {g.get('transport')}" + (f" ({g['hierarchy']})" if g.get("hierarchy") not in (None, "None") else "")
                         + (f", across nodes {_mb(g['across'])} MB" if g.get("across") else "")
                         + (f", library count {_mb(g['own'])} MB" if g.get("own") else "")
                         for w, g in zip(worlds, got) if "step_ms" in g)  # fmt: skip
        lines.append(f"- `{cfg}`: {desc or 'not measured'}")
    lines += _costs_section(costs, meta)
    lines += _validation_section(val, worlds, configs)
    lines += _extrapolation_section(data)
    lines += ["", "## Skipped", ""] + ([f"- `{c}`: {why}" for c, why in data["skipped"].items()] or ["- nothing"])
    return "\n".join(lines) + "\n"


def _costs_section(costs: dict, meta: dict) -> list[str]:
    lines = [
        "",
        "## Per-element compression costs (this CPU, one thread)",
        "",
        "The compressor calls the hook makes, timed in one process (median of "
        f"{meta['repeats']}, measured before and after the runs, the lower of the two kept): `encode_batch` with the "
        "error-feedback residual on 2M elements and on 2048 pieces of 1024 of them (the difference: per call), `decode_batch` of 1 and of 8 payloads (the difference: per payload decoded); "
        "PowerSGD: the library's own exchange on one rank (`PowerSGDTransport`: M = x + e, M Q, orthonormalize, "
        "M^T P, the error, P Q^T; its allreduces no-ops) of a 1024 x 2048 and a 64 x 512 matrix, rank 4, all under "
        "encode. Nanoseconds per element (per element per payload for decode):",
        "",
        "| compressor | encode | x `y += x` | per call (us) | decode per payload | decode, once | per call (us) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    add = costs["cpu"]["add"]
    for key, c in costs["cpu"].items():
        if isinstance(c, dict):
            lines.append(f"| {key} | {1e9 * c['encode']:.2f} | {c['encode'] / add:.1f} | {1e6 * c['encode_call']:.1f} | "
                         f"{1e9 * c['decode']:.3f} | {1e9 * c['decode_out']:.2f} | {1e6 * c['decode_call']:.1f} |")  # fmt: skip
    lines.append(f"| `y += x` (a memory pass) | {1e9 * add:.2f} | 1.0 | | | | |")
    gpu = "; a GPU variant from " + meta["gpu_costs"] if meta.get("gpu_costs") else (
        "; no GPU was available to this study, so no GPU costs were measured (`--gpu-costs FILE` adds them)")
    lines += ["", f"PowerSGD source: {costs['cpu']['powersgd_r4'].get('source')}{gpu}."]
    return lines


def _validation_section(val: dict, worlds, configs) -> list[str]:
    probes = ", ".join(f"N={p['world']} {1e6 * p['alpha_s']:.0f} us" for p in val.get("alpha_probes", []))
    lines = [
        "",
        "## The model against the measured points",
        "",
        "Predicted step = the launch's compute-only step with all N ranks at once (measured) + the collectives on the "
        "loopback (`steps x alpha + bytes x s / B`) + the compression from the per-element costs x s; no overlap. "
        "s = the launch's compute-only step with all ranks at once over rank 0's alone: how much the ranks slow each "
        f"other (and the machine's other load slows them) on its {val['cores']} cores, max(1, N/C) on an idle host. "
        + (f"alpha from the dense launches' latency probe (an allreduce of one element after the timed steps, "
           f"median of the slowest rank, over 2(N-1) messages: {probes}; the median is used), B by least squares on "
           "the dense steps with that alpha: " if probes else "alpha and B fitted by least squares on the dense steps: ")
        + f"alpha = {1e6 * val['alpha_s']:.0f} us per message, B = {val['bandwidth_Bps'] / 1e9:.2f} GB/s.",
        "",
        "| dense | messages | bytes x s | comm measured (step - compute) | fitted |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in val["dense_fit"]:
        lines.append(f"| N={p['world']} | {p['messages']} | {_mb(p['scaled_bytes'])} MB | {p['comm_ms']:.0f} ms | {p['fitted_ms']:.0f} ms |")
    lines += ["", "Each cell: measured / predicted ms (ratio; in brackets the ratio when the hook's own measured encode + "
              "decode time, rank 0 wall clock, replaces the per-element cost model: what is left is the communication "
              "model and the overlap).", "",
              "| configuration | " + " | ".join(f"N={w}" for w in worlds)
              + f" | s at N={worlds[-1]} (idle: {max(1.0, worlds[-1] / val['cores']):.0f}) | predicted at N={worlds[-1]}: "
              f"compute + comm + compression | hook's encode + decode at N={worlds[-1]} |",
              "|---|" + "---:|" * len(worlds) + "---:|---|---:|"]  # fmt: skip
    by = {(r["config"], r["world"]): r for r in val["rows"]}
    for cfg in configs:
        cells = []
        for w in worlds:
            r = by[(cfg, w)]
            if "ratio" not in r:
                cells.append(f"model only: {r['predicted_ms']:.0f}")
                continue
            hooked = f" [{r['ratio_with_hook']:.2f}]" if "ratio_with_hook" in r else ""
            cells.append(f"{r['measured_ms']:.0f} / {r['predicted_ms']:.0f} ({r['ratio']:.2f}{hooked})")
        last = by[(cfg, worlds[-1])]
        split = f"{last['compute_ms']:.0f} + {last['predicted_comm_ms']:.0f} + {last['predicted_compress_ms']:.0f}"
        hook = f"{last['hook_ms']:.0f}" if last.get("hook_ms") else ""
        lines.append(f"| `{cfg}` | " + " | ".join(cells) + f" | {last['stretch']:.1f} | {split} | {hook} |")
    ratios = [r["ratio"] for r in val["rows"] if "ratio" in r and r["config"] != "dense"]
    hooked = [r["ratio_with_hook"] for r in val["rows"] if "ratio_with_hook" in r]
    if ratios:
        lines += ["", f"Compressed configurations: measured / predicted from {min(ratios):.2f} to {max(ratios):.2f} "
                  f"(median {statistics.median(ratios):.2f}) over {len(ratios)} points"
                  + (f"; with the hook's own time from {min(hooked):.2f} to {max(hooked):.2f} (median "
                     f"{statistics.median(hooked):.2f})." if hooked else ".")]  # fmt: skip
    under = [r["hook_ms"] / r["predicted_compress_ms"] for r in val["rows"]
             if r["world"] == worlds[-1] and r.get("hook_ms") and r["predicted_compress_ms"] > 0]  # fmt: skip
    if under:
        lines += ["", f"At N={worlds[-1]} the hook's own encode + decode time is {min(under):.1f} to {max(under):.1f} times "
                  f"(median {statistics.median(under):.1f}) what the per-element costs of its compressor calls predict "
                  "(both stretched alike): the hook's work besides those calls is not in the cost model, and the "
                  "extrapolation below, which uses the per-element costs, leaves it out alike."]  # fmt: skip
    mism = [(r["config"], r["world"], r["measured_kinds"], r["model_kinds"]) for r in val["rows"]
            if "measured_kinds" in r and r["measured_kinds"] != r["model_kinds"]]  # fmt: skip
    lines += ["", "Collectives per step, measured against the model: " + ("all alike (kinds, groups and counts)."
              if not mism else "they differ for " + "; ".join(f"`{c}` N={w}: measured {m}, model {p}" for c, w, m, p in mism))]  # fmt: skip
    return lines


def _extrapolation_section(data: dict) -> list[str]:
    ex = data["extrapolation"]
    refused = [label for label, _, cfg in EXTRAPOLATED if cfg is not None and label != VARIANT
               and f"resnet50|10|{label}|hier|cpu" not in ex]  # fmt: skip
    lines = [
        "",
        "## Extrapolation",
        "",
        f"Nodes of {RANKS_PER_NODE} ranks; inside a node a link of {INTRA['bandwidth_Bps'] / 1e9:.0f} GB/s per rank and "
        f"direction and {1e6 * INTRA['alpha_s']:.0f} us per message (NVLink-class, assumed); between nodes one link per "
        f"node of 10 or 100 Gbit/s and {1e6 * INTER_ALPHA_S:.0f} us per message (assumed), a non-blocking switch. Ring "
        "allreduce, all_gather and reduce-scatter laid out node by node (each node's link carries one ring edge), "
        "pairwise all_to_all (each node's link carries what its ranks send to other nodes). DDP's buckets (1 MiB, then "
        "25 MiB). Ring latency in these tables (the next section bounds it from below). Exchange time = the step's "
        "collectives in sequence + the compression at the per-element costs "
        "measured here on one CPU core (`cpu`) or none (`comm only`: the bound that faster compression approaches); "
        "compute is not included (no overlap is assumed, so a step is compute + exchange). Hierarchical: the library's "
        "exchange (all_to_all of fp32 shards in the node, the compressed shard across nodes, all_gather in the node); "
        "for dense, a hierarchical ring (reduce-scatter, allreduce across, all_gather) that DDP itself does not do. "
        "Configurations the library refuses hierarchically have no hierarchical row"
        + (f" ({', '.join(refused)})." if refused else "."),
    ]
    for model, (title, _) in MODELS.items():
        for gbit in (10, 100):
            lines += ["", f"### {title}, {gbit} Gbit/s between nodes", "",
                      "| configuration | " + " | ".join(f"N={w} ms (x dense)" for w in (8, 64, 256, 1024))
                      + " | N=1024 comm only ms (x dense) | N=1024 MB/rank | N=1024 MB over a node's link |",
                      "|---|" + "---:|" * 7]  # fmt: skip
            dense = {w["world"]: w for w in ex[f"{model}|{gbit}|dense|flat|cpu"]}
            dense_free = {w["world"]: w for w in ex[f"{model}|{gbit}|dense|flat|free"]}
            for label, _, _ in EXTRAPOLATED:
                for hier in ("flat", "hier"):
                    key = f"{model}|{gbit}|{label}|{hier}|cpu"
                    if key not in ex:
                        continue
                    pts = {w["world"]: w for w in ex[key]}
                    free = {w["world"]: w for w in ex[f"{model}|{gbit}|{label}|{hier}|free"]}
                    cells = [f"{_ms(1e3 * pts[w]['total_s'])} ({dense[w]['total_s'] / pts[w]['total_s']:.2f})"
                             for w in (8, 64, 256, 1024)]  # fmt: skip
                    f1024 = free[1024]
                    cells.append(f"{_ms(1e3 * f1024['total_s'])} ({dense_free[1024]['total_s'] / f1024['total_s']:.2f})")
                    cells += [_mb(pts[1024]["sent_bytes"]), _mb(pts[1024]["nic_bytes"])]
                    name = label + (", hierarchical" if hier == "hier" else "")
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### The latency assumption: ResNet-50 on 1024 ranks", "",
              "ms per step, x dense in brackets. `ring`: every message of the ring and pairwise algorithms pays "
              f"alpha ({1e6 * INTER_ALPHA_S:.0f} us between nodes; a pessimistic bound at this scale); `log`: an "
              "allreduce pays it only 2 log2 g times, the other collectives log2 g times, with the same bytes (trees, "
              "recursive doubling, Bruck: an optimistic bound). `comm`: communication only; `+ cpu`: with the "
              "compression at this CPU core's measured cost.", "",
              "| configuration | 10 Gbit/s ring, comm | 10 Gbit/s log, comm | 10 Gbit/s log + cpu | 100 Gbit/s ring, "
              "comm | 100 Gbit/s log, comm | 100 Gbit/s log + cpu |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, _, _ in EXTRAPOLATED:
        for hier in ("flat", "hier"):
            if f"resnet50|10|{label}|{hier}|free" not in ex:
                continue
            cells = []
            for gbit in (10, 100):
                for tail in ("free", "free|log", "cpu|log"):
                    point = ex[f"resnet50|{gbit}|{label}|{hier}|{tail}"][-1]
                    dense = ex[f"resnet50|{gbit}|dense|flat|{tail}"][-1]
                    cells.append(f"{_ms(1e3 * point['total_s'])} ({dense['total_s'] / point['total_s']:.2f})")
            lines.append(f"| {label}{', hierarchical' if hier == 'hier' else ''} | " + " | ".join(cells) + " |")
    if "gpu" in {k.split("|")[4] for k in ex}:
        lines += ["", "A GPU variant (`--gpu-costs`) is in scale_study.json under the device `gpu`."]
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, val, ex = data["runs"], data["validation"], data["extrapolation"]
    worlds = sorted(int(w) for w in runs)
    fig, axes = plt.subplots(3, 2, figsize=(13, 15))
    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), 5, 9)]
    by = {(r["config"], r["world"]): r for r in val["rows"]}
    order = list(dict.fromkeys([*SHORT.values(), *(label for label, _, _ in EXTRAPOLATED)]))

    def color_of(label: str):  # one colour per configuration in every panel
        return "k" if label == VARIANT else palette[order.index(label) % len(palette)] if label in order else "0.5"

    for cfg in data["configs"]:
        color = color_of(SHORT.get(cfg, cfg))
        for ax, measured, modelled, scale in ((axes[0][0], "measured_sent", "model_sent", 1e6),
                                              (axes[0][1], "measured_ms", "predicted_ms", 1.0)):  # fmt: skip
            pts = [(w, by[(cfg, w)]) for w in worlds]
            ax.plot([w for w, _ in pts], [r[modelled] / scale for _, r in pts], "--", color=color, lw=1)
            got = [(w, r[measured] / scale) for w, r in pts if measured in r]
            if got:
                ax.plot(*zip(*got), "o-", color=color, label=SHORT.get(cfg, cfg), lw=1.5)
    axes[0][1].plot(worlds, [compute_ms(runs, w) for w in worlds], "k:", label="compute only, N ranks at once")
    for ax, title, unit in ((axes[0][0], "measured: MB per rank per step", "MB"),
                            (axes[0][1], "measured: median step time", "ms")):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("gloo ranks on this machine (2 cores), 6.3M-parameter MLP")
        ax.set_ylabel(unit)
        ax.set_title(title + " (points; dashed: the model)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, loc="lower right")
    axes[0][1].legend(fontsize=7, loc="upper left")
    for row, device, what in ((1, "free", "communication only (compression free)"),
                              (2, "cpu", "compression at this CPU core's measured cost")):  # fmt: skip
        for ax, gbit in ((axes[row][0], 10), (axes[row][1], 100)):
            for label in PLOTTED:
                for hier, style in (("flat", "-"), ("hier", "--")):
                    key = f"resnet50|{gbit}|{label}|{hier}|{device}"
                    if key not in ex:
                        continue
                    pts = ex[key]
                    ax.plot([p["world"] for p in pts], [1e3 * p["total_s"] for p in pts], style,
                            color=color_of(label), lw=1.5,
                            label=(label if label != VARIANT else "sign+EF two_pass, small tensors by\nallreduce (not the library)")
                            if hier == "flat" else None)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"ranks ({RANKS_PER_NODE} per node)")
            ax.set_ylabel("exchange time per step, ms (model)")
            ax.set_title(f"ResNet-50, {gbit} Gbit/s between nodes, {what};\nring latency; solid: flat, dashed: "
                         "hierarchical", fontsize=10)  # fmt: skip
            ax.grid(alpha=0.3, which="both")
        axes[row][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----- main ----------------------------------------------------------------------------------------
def _git_state() -> str:
    """The commit measured, and the library files that differed from it (others' work in progress)."""
    import subprocess

    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_compress", "kernels"], cwd=root,
                               capture_output=True, text=True).stdout.split("\n")  # fmt: skip
    except OSError:
        return "?"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--configs", default=None, help="';'-separated CompressionConfig strings ('dense': DDP's allreduce)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="repeats of each per-element timing")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds before one launch's ranks are killed")
    p.add_argument("--gpu-costs", default=None, help="JSON of per-element costs measured on a GPU (the 'costs' shape)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--quick", action="store_true", help="2 ranks, a small model, 2 steps, into a temp dir")
    p.add_argument("--from-json", default=None, help="re-render the report and plot from a saved scale_study.json")
    args = p.parse_args(argv)
    if args.from_json:  # the measurements as saved; the model's parts computed again
        data = json.loads(Path(args.from_json).read_text())
        if args.gpu_costs:
            data["costs"]["gpu"] = json.loads(Path(args.gpu_costs).read_text())
            data["meta"]["gpu_costs"] = args.gpu_costs
        data["meta"]["rendered"] = " ".join(["python benchmarks/scale_study.py", *(argv if argv is not None else sys.argv[1:])])
        return _write(derive(data), Path(args.out_dir or Path(args.from_json).parent))
    if args.quick:
        args.worlds, args.steps, args.warmup, args.repeats, args.deadline = "2", 2, 1, 3, 120.0
    args.worlds = [int(w) for w in str(args.worlds).split(",")]
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="scale_study_")) if args.quick
                                                       else HERE / "results")  # fmt: skip
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    wanted = [c for c in (args.configs.split(";") if args.configs else (QUICK_CONFIGS if args.quick else CONFIGS)) if c]
    configs, skipped = [], {}
    for cfg in wanted:
        why = available(cfg)
        if why is None:
            configs.append(cfg)
        else:
            skipped[cfg] = f"the library does not build it here ({why}); model only"
            print(f"note: skipping `{cfg}`: {why}", flush=True)
    start, load_start = time.time(), _load()
    print("per-element costs ...", flush=True)
    costs = {"cpu_start": measure_costs(args.repeats)}
    print("measured runs ...", flush=True)
    runs = measure(args, configs, widths)
    print("per-element costs again ...", flush=True)
    costs["cpu_end"] = measure_costs(args.repeats)
    costs["cpu"] = lower_costs(costs["cpu_start"], costs["cpu_end"])
    if args.gpu_costs:
        costs["gpu"] = json.loads(Path(args.gpu_costs).read_text())
    cores = os.cpu_count() or 1
    data = {
        "meta": {"machine": f"{cpu_model()}, {cores} cores, {platform.system()}, torch {torch.__version__}, "
                            f"Python {platform.python_version()}; gloo on 127.0.0.1, one thread per rank",
                 "command": " ".join(["python benchmarks/scale_study.py", *(argv if argv is not None else sys.argv[1:])]),
                 "date": datetime.date.today().isoformat(), "wall_min": (time.time() - start) / 60,
                 "git": _git_state(), "load_start": load_start, "load_end": _load(), "widths": list(widths), "batch": args.batch,
                 "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "gpu_costs": args.gpu_costs,
                 "cores": cores},
        "configs": configs, "skipped": skipped, "costs": costs, "runs": runs,
    }  # fmt: skip
    _write(derive(data), out_dir)


def derive(data: dict) -> dict:
    """The model's parts of ``data`` from its measurements: the validation and the extrapolation."""
    costs, meta = data["costs"], data["meta"]
    cores = meta.setdefault("cores", os.cpu_count() or 1)
    data["validation"] = validate(data["runs"], costs["cpu"], data["configs"], meta["widths"], cores)
    devices = {"cpu": costs["cpu"], "free": None, **({"gpu": costs["gpu"]} if "gpu" in costs else {})}
    data["extrapolation"] = extrapolate(devices)
    data["schemes"] = {label: asdict(s) for label, s, _ in EXTRAPOLATED}
    meta["assumptions"] = {"intra": INTRA, "inter_alpha_s": INTER_ALPHA_S, "ranks_per_node": RANKS_PER_NODE}
    return data


def _dump(data: dict) -> str:
    """JSON with an indent; each extrapolated series on one line, as columns (``{"world": [...], ...}``)."""
    body = json.dumps({k: v for k, v in data.items() if k != "extrapolation"}, indent=1)
    columns = {k: {f: [p[f] for p in pts] for f in pts[0]} for k, pts in data.get("extrapolation", {}).items()}
    series = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in columns.items())
    return body[:-2] + ',\n "extrapolation": {\n' + series + "\n }\n}\n"


def _write(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale_study.json").write_text(_dump(data))
    text = report(data)
    (out_dir / "scale_study.md").write_text(text)
    plot(data, out_dir / "scale_study.png")
    print(text)
    print(f"written: {out_dir / 'scale_study.md'}, .json, .png")


if __name__ == "__main__":
    main()
