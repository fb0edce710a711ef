"""Step time and accuracy of compressed gradient exchange on a throttled network, against the alternatives.

Starts N gloo ranks (2 by default) inside Linux network namespaces whose links are throttled
with ``tc`` token-bucket filters (100 Mbit/s, 1 Gbit/s, 10 Gbit/s, unthrottled) and, in the same
run, compares

* dense DDP (allreduce, no hook), PyTorch's ``fp16_compress_hook`` and ``powerSGD_hook``;
* the compute-only floor: the same model and per-rank batch in one process, no communication;
* lightning_compress configurations (``register_compression``), GraVAC included,

on two workloads: (a) the median step time of a communication-bound 25.18M-parameter MLP on
random data at every bandwidth; (b) the final test accuracy of the digits MLP of
``examples/ddp_digits.py`` after a fixed number of epochs (once per configuration, in the
unthrottled run: accuracy does not depend on bandwidth). Writes
``benchmarks/results/network.md`` (tables, goal check, time split), ``network.json`` (raw),
``network_step_time.png`` and ``network_accuracy_bytes.png``::

    python benchmarks/network.py                              # all bandwidths, shared loopback
    python benchmarks/network.py --veth                       # one namespace per rank, veth links
    python benchmarks/network.py --quick                      # smoke check, well under a minute
    python benchmarks/network.py --bandwidths 1gbit,none --configs "dense;compressor=sign,feedback=ef"
    python benchmarks/network.py --veth --ranks 4 --nodes 2 --bandwidths 1gbit --name network_hierarchical \
        --configs "dense;compressor=sign,feedback=ef;compressor=sign,feedback=ef,hierarchical=true,ranks_per_node=2"

Namespaces (root, ``ip`` and ``tc`` needed; otherwise the run says so and measures unthrottled
on the host loopback only):

* shared loopback (default): one namespace per bandwidth, both ranks inside, talking over its
  ``lo``, which carries a ``tbf`` qdisc. Every byte either rank sends passes that one qdisc, so
  the ranks *share* the rate: in a 2-rank ring allreduce each rank sends and receives at about
  half the nominal rate at once (a full-duplex link gives each direction the full rate).
* ``--veth``: one namespace per rank, each its own host. With 2 ranks a veth pair joins them
  (10.77.0.1 and 10.77.0.2); with more, every rank's veth ends in a hub namespace holding a
  bridge. Both ends of every veth carry a ``tbf`` (a rank's upload and download), so each
  direction of each link gets the full rate, as on a switched full-duplex network.
* ``--veth --nodes N``: one namespace per *node*, holding ``ranks / N`` ranks (numbered node by
  node, with torchrun's ``LOCAL_WORLD_SIZE`` and ``LOCAL_RANK`` set). Ranks of a node talk over the
  namespace's loopback, unthrottled (a packet to the node's own address never leaves it); nodes
  are joined as hosts are above (a veth pair for 2 nodes, a bridge for more), throttled at both
  ends: fast links inside a node, slow ones between nodes, for the hierarchical exchange.

``tbf`` burst: ``max(128 KiB, rate / 250)`` bytes (4 ms of tokens at the rate, a kernel tick at
HZ=250; at least two 64 KiB packets: a packet bigger than the bucket never passes and stalls TCP,
and the loopback's MTU is 65536 bytes plus its header);
``latency 50ms`` bounds the queue. Namespaces are named ``lcbench_<pid>_<tag>``; they are
deleted when the run ends, fails or is interrupted (SIGINT/SIGTERM), and leftovers of dead runs
are deleted at start.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository's own package first (over an installed one).
sys.path[:0] = [str(ROOT)]
WORKER = ROOT / "benchmarks" / "network_worker.py"

from _machine import cpu_model, free_port  # noqa: E402  (this folder, on sys.path when run as a script)

RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "lcbench_"

DEFAULT_BANDWIDTHS = "100mbit,1gbit,10gbit,none"
GRAVAC = {"theta_min": 25, "epsilon": 0.3, "window": 20}
TORCH_CONFIGS = ("dense", "fp16", "powersgd_r2", "powersgd_r2_sync")
SIGN_EF = "compressor=sign,feedback=ef"
TOPK_EF = "compressor=topk,density=0.01,feedback=ef"
SIGN_DS = "compressor=sign,feedback=doublesqueeze"
OURS = (
    SIGN_EF,
    TOPK_EF,
    SIGN_DS,
    "compressor=topk,density=0.01,feedback=ef21",
    "compressor=qsgd,bits=4,block_size=128,feedback=ef",
    "compressor=randk,density=0.01,feedback=diana",
    "compressor=powersgd,powersgd_rank=2,feedback=ef",
    "gravac:compressor=topk,feedback=ef",
)
DEFAULT_CONFIGS = TORCH_CONFIGS + OURS
QUICK_CONFIGS = ("dense", "fp16", "powersgd_r2_sync", SIGN_EF, TOPK_EF)

# Goals: unthrottled, sign+ef and top-k+ef no slower than dense DDP; at 1 Gbit/s both within 1.5x
# the compute-only floor of the ranks running together and >= 8x faster than dense, and
# sign+DoubleSqueeze within 1.2x sign+ef's step; at 100 Mbit/s top-k+ef >= 25x faster than dense;
# digits accuracy within 1 point of dense.
GOAL_FLOOR_1G, GOAL_SPEEDUP_1G, GOAL_DS_VS_EF, GOAL_SPEEDUP_100M, GOAL_ACC_POINTS = 1.5, 8.0, 1.2, 25.0, 1.0


# ----- bandwidths --------------------------------------------------------------------------------------------
def parse_rate(text: str) -> float | None:
    """``'100mbit'`` -> 1e8 bit/s; ``'none'`` -> None (unthrottled)."""
    text = text.strip().lower()
    if text in ("none", "unthrottled", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", text)
    if not m:
        raise ValueError(f"bandwidth {text!r}: use e.g. 100mbit, 1gbit, 10gbit or none")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def tbf_burst(rate_bits: float) -> int:
    """Bucket size in bytes: 4 ms of tokens (rate/250), at least 128 KiB (two 64 KiB loopback packets).

    A packet larger than the bucket can never pass: tbf drops it, TCP resends the same size, and
    the connection stalls. The loopback's MTU is 65536 bytes (plus a 14-byte header), so a 64 KiB
    bucket is one byte short; 128 KiB leaves room for any packet of ``lo`` or of a veth.
    """
    return max(128 * 1024, math.ceil(rate_bits / 8 / 250))


def pretty_rate(rate: float | None) -> str:
    if rate is None:
        return "unthrottled"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:g} {unit}"
    return f"{rate:g} bit/s"


# ----- namespaces --------------------------------------------------------------------------------------------
def sh(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def list_namespaces() -> list[str]:
    try:
        return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    except RuntimeError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_leftovers() -> list[str]:
    """Delete ``lcbench_<pid>_*`` namespaces whose run (pid) is gone; returns their names."""
    gone = []
    for name in list_namespaces():
        m = re.match(rf"{PREFIX}(\d+)_", name)
        if name.startswith(PREFIX) and not (m and pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid()):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            gone.append(name)
    return gone


def netns_capability() -> str | None:
    """``None`` when throttled namespaces can be made here, else why not."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "not a POSIX system"
    if os.geteuid() != 0:
        return "not running as root (network namespaces and tc need root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2 is needed)"
    probe = f"{PREFIX}{os.getpid()}_probe"
    try:
        sh("ip", "netns", "add", probe)
        try:
            sh("ip", "-n", probe, "link", "set", "lo", "up")
            sh("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst", "256kb",
               "latency", "50ms")  # fmt: skip
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    except RuntimeError as err:
        return f"cannot create a throttled namespace: {err}"
    return None


@dataclass
class Topology:
    """Where each rank runs: namespace (None: the host), device for gloo, address of rank 0."""

    namespaces: list[str | None]
    ifnames: list[str]
    master_addr: str
    description: str
    qdiscs: list[str] = field(default_factory=list)
    env: list[dict[str, str]] = field(default_factory=list)  # per rank, extra environment (node topologies)


class Namespaces:
    """Creates namespaces and removes every one of them (and the ranks) however the run ends."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._cleaned = False

    def add(self, name: str) -> str:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def throttle(self, ns: str, dev: str, rate: float | None) -> str | None:
        if rate is None:
            return None
        burst = tbf_burst(rate)
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate)}bit",
           "burst", str(burst), "latency", "50ms")  # fmt: skip
        return f"{ns}/{dev}: tbf rate {pretty_rate(rate)} burst {burst} B latency 50ms"

    def remove(self, names: list[str]) -> None:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            if name in self.created:
                self.created.remove(name)

    def kill_ranks(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.kill_ranks()
        self.remove(list(reversed(self.created)))

    # ----- topologies -----
    def shared(self, tag: str, rate: float | None, world: int) -> Topology:
        ns = self.add(f"{PREFIX}{os.getpid()}_{tag}")
        q = self.throttle(ns, "lo", rate)
        return Topology([ns] * world, ["lo"] * world, "127.0.0.1",
                        f"shared loopback: all {world} ranks in namespace {ns}, over its lo", [q] if q else [])  # fmt: skip

    def veth(self, tag: str, rate: float | None, world: int, nodes: int = 0) -> Topology:
        """One namespace per rank, or with ``nodes`` one per node of ``world // nodes`` ranks (see the docstring)."""
        ranks, per = world, 1
        if nodes:
            world, per = nodes, ranks // nodes  # below, `world` counts the hosts: one per node
        base = f"{PREFIX}{os.getpid()}_{tag}"
        spaces = [self.add(f"{base}_{'n' if nodes else 'r'}{r}") for r in range(world)]
        addrs = [f"10.77.0.{r + 1}" for r in range(world)]
        ifnames = [f"lcb{r}" for r in range(world)]
        qdiscs: list[str | None] = []
        if world == 2:
            sh("ip", "link", "add", ifnames[0], "netns", spaces[0], "type", "veth", "peer", "name", ifnames[1],
               "netns", spaces[1])  # fmt: skip
            desc = f"veth: one namespace per rank ({', '.join(spaces)}), joined by a veth pair"
        else:
            hub = self.add(f"{base}_hub")
            sh("ip", "-n", hub, "link", "add", "lcbbr", "type", "bridge")
            sh("ip", "-n", hub, "link", "set", "lcbbr", "up")
            for r in range(world):
                sh("ip", "link", "add", ifnames[r], "netns", spaces[r], "type", "veth", "peer", "name", f"lcbp{r}",
                   "netns", hub)  # fmt: skip
                sh("ip", "-n", hub, "link", "set", f"lcbp{r}", "master", "lcbbr")
                sh("ip", "-n", hub, "link", "set", f"lcbp{r}", "up")
                qdiscs.append(self.throttle(hub, f"lcbp{r}", rate))  # the rank's download
            desc = f"veth: one namespace per rank ({', '.join(spaces)}), each veth to a bridge in {hub}"
        for r in range(world):
            sh("ip", "-n", spaces[r], "addr", "add", f"{addrs[r]}/24", "dev", ifnames[r])
            sh("ip", "-n", spaces[r], "link", "set", ifnames[r], "up")
            qdiscs.append(self.throttle(spaces[r], ifnames[r], rate))  # the rank's upload (2 ranks: the peer's download)
        if not nodes:
            return Topology(spaces, ifnames, addrs[0], desc, [q for q in qdiscs if q])
        link = "one veth pair" if world == 2 else f"a veth each to a bridge in {base}_hub"
        desc = (f"{nodes} node namespaces ({', '.join(spaces)}) of {per} ranks each: inside a node the ranks talk over "
                f"its loopback (unthrottled), between nodes over {link}, throttled at both ends")  # fmt: skip
        env = [{"LOCAL_WORLD_SIZE": str(per), "LOCAL_RANK": str(r % per)} for r in range(ranks)]
        return Topology([spaces[r // per] for r in range(ranks)], [ifnames[r // per] for r in range(ranks)], addrs[0],
                        desc, [q for q in qdiscs if q], env)  # fmt: skip


def host_topology(world: int) -> Topology:
    return Topology([None] * world, ["lo"] * world, "127.0.0.1", "host loopback, unthrottled (no namespaces)")


# ----- running ranks -----------------------------------------------------------------------------------------
_PORT = [29500 + os.getpid() % 500 * 40]


def next_port() -> int:
    _PORT[0] += 1
    return _PORT[0]



def error_from_log(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "Warning" not in ln]
    for ln in lines:
        if ln.startswith("what():"):
            return ln[len("what():"):].strip()
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln
    return lines[-1] if lines else "no output"


def short_error(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\[/__w/pytorch/pytorch/third_party/", "[", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Runner:
    """Runs configurations in groups of ranks, one process per rank, each group a few configurations long.

    The ranks run the configurations one after the other in one process group (the imports, about
    5 s per process here, are paid once per group) and rewrite their JSON after each one. A rank
    stops at the first configuration that fails; that configuration is recorded as failed (with
    the crashed rank's message) and the rest run again in a fresh group.
    """

    def __init__(self, args, nets: Namespaces | None, logdir: Path):
        self.args, self.nets, self.logdir = args, nets, logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def run(self, topo: Topology, world: int, configs: list[str], worker_args: list[str], timeout: float,
            on_done=None) -> dict[str, tuple[list[dict | None], str | None]]:  # fmt: skip
        """``{config: (each rank's record or None, error or None)}``; ``timeout`` is per configuration."""
        done: dict[str, tuple[list[dict | None], str | None]] = {}
        pending = list(configs)
        while pending:
            for cfg, value in self._group(topo, world, pending, worker_args, timeout, done, on_done).items():
                done[cfg] = value
                if on_done is not None and value[1] is not None:
                    on_done(cfg, *value)
            pending = [c for c in pending if c not in done]
        return done

    def _read(self, outs: list[Path]) -> list[dict]:
        runs = []
        for path in outs:
            try:
                runs.append(json.loads(path.read_text())["runs"])
            except (OSError, ValueError, KeyError):
                runs.append({})
        return runs

    def _group(self, topo, world, configs, worker_args, timeout, done, on_done):
        self.count += 1
        port = free_port() if topo.namespaces[0] is None else next_port()
        outs = [self.logdir / f"group{self.count}_r{r}.json" for r in range(world)]
        logs = [self.logdir / f"group{self.count}_r{r}.log" for r in range(world)]
        for path in outs:  # a record left by an earlier runner in the same folder must not be read as this one's
            path.unlink(missing_ok=True)
        config_args = [arg for c in configs for arg in ("--config", c)]
        procs = []
        for r in range(world):
            ns = topo.namespaces[r]
            cmd = (["ip", "netns", "exec", ns] if ns else []) + [sys.executable, str(WORKER), *worker_args,
                                                                 *config_args, "--out", str(outs[r])]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       MASTER_ADDR=topo.master_addr, MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                       GLOO_SOCKET_IFNAME=topo.ifnames[r], **(topo.env[r] if topo.env else {}))  # fmt: skip
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)))
            if self.nets is not None:
                self.nets.procs.append(procs[-1])
        finished: dict[str, tuple[list[dict | None], str | None]] = {}
        last_progress, failed_at, timed_out = time.monotonic(), None, False

        def collect() -> None:
            nonlocal last_progress
            runs = self._read(outs)
            for cfg in configs:
                if cfg in finished:
                    continue
                recs = [run.get(cfg) for run in runs]
                if any(rec is None for rec in recs):
                    break  # configurations finish in order
                finished[cfg] = (recs, None)
                last_progress = time.monotonic()
                if on_done is not None:
                    on_done(cfg, recs, None)

        while any(p.poll() is None for p in procs):
            time.sleep(0.25)
            collect()
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now  # a rank failed: give the others a moment to record it and stop
            if now - last_progress > timeout:
                timed_out = True
            if timed_out or (failed_at is not None and now - failed_at > 20):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait()
        collect()
        if self.nets is not None:
            self.nets.procs = [p for p in self.nets.procs if p not in procs]
        rest = [c for c in configs if c not in finished]
        stopped_on_error = any("error" in (rec or {}).get(part, {}) for recs, _ in finished.values() for rec in recs
                               for part in ("step", "digits"))  # fmt: skip
        if rest and not stopped_on_error:
            # The first unfinished configuration is the one that failed (crash, hang or a rank's error).
            cfg = rest[0]
            recs = [run.get(cfg) for run in self._read(outs)]
            if timed_out:
                error = f"timed out: no progress for {timeout:.0f} s"
            else:
                crashed = [r for r in range(world) if recs[r] is None and procs[r].returncode != 0]
                r = crashed[0] if crashed else next((r for r in range(world) if procs[r].returncode != 0), 0)
                error = error_from_log(logs[r])
            finished[cfg] = (recs, error)
        return {c: finished[c] for c in configs if c in finished and (c not in done)}


# ----- measurements ------------------------------------------------------------------------------------------
def worker_common(args) -> list[str]:
    common = ["--batch", str(args.batch), "--warmup", str(args.warmup), "--target-seconds", str(args.target_seconds),
              "--min-steps", str(args.min_steps), "--max-steps", str(args.max_steps), "--epochs", str(args.epochs),
              "--gravac", json.dumps(GRAVAC)]  # fmt: skip
    return (common + ["--model", args.model] + (["--quick"] if args.quick else [])
            + (["--bucket-view"] if getattr(args, "bucket_view", False) else []))


def merge_step(results: list[dict | None], part: str = "step") -> tuple[dict | None, str | None]:
    """Rank 0's record, with the step times replaced by the slowest rank's at each step."""
    parts = [r.get(part) if r else None for r in results]
    errors = [p["error"] for p in parts if p and "error" in p]
    if errors:
        return None, errors[0]
    if any(p is None for p in parts):
        return None, None
    rec = dict(parts[0])
    if part == "step":
        n = min(len(p["steps"]) for p in parts)
        rec["steps"] = [max(p["steps"][i] for p in parts) for i in range(n)]
        rec["median_s"] = statistics.median(rec["steps"])
    return rec, None


def measure_floor(runner: Runner, args, procs: int = 1) -> dict:
    """The compute-only floor: ``procs`` independent processes at once (no process group); slowest per step."""
    got = runner.run(host_topology(procs), procs, ["floor"], ["--mode", "floor", *worker_common(args)], timeout=300)
    recs, error = got["floor"]
    rec, err = merge_step(recs)
    if rec is None:
        raise RuntimeError(f"the compute-only floor failed: {err or error}")
    return rec


# ----- report ------------------------------------------------------------------------------------------------
def mb(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:,.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:,.1f} kB"
    return f"{n:.0f} B"


def label_of(cfg: str) -> str:
    return {
        "dense": "dense DDP (allreduce)",
        "fp16": "PyTorch fp16_compress_hook",
        "floor": "compute-only floor (1 process)",
    }.get(cfg, f"PyTorch powerSGD_hook (rank {cfg[10:].split('_')[0]}{', waited per bucket' if cfg.endswith('_sync') else ''})"
          if cfg.startswith("powersgd_r") else f"`{cfg}`")


def is_ours(cfg: str) -> bool:
    return "compressor=" in cfg


def machine() -> dict:
    model = cpu_model() or "unknown"
    from importlib.metadata import version  # (importing torch here would cost seconds)

    return {
        "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
        or " ".join(platform.uname()),
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": version("torch"),
        "python": platform.python_version(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def summarize(data: dict) -> None:
    """Derived numbers (speedups, floor ratios, best configs, goals) into ``data``."""
    floor = data["floor_s"]
    digits = data["digits"]
    dense_acc = digits.get("dense", {}).get("accuracy")
    for bw in data["bandwidths"]:
        rows = data["steps"][bw]
        dense = rows.get("dense", {}).get("median_s")
        for rec in rows.values():
            if rec.get("median_s") is not None:
                rec["speedup"] = dense / rec["median_s"] if dense else None
                rec["x_floor"] = rec["median_s"] / floor
        candidates = [(rec["median_s"], cfg) for cfg, rec in rows.items() if cfg != "dense" and rec.get("median_s")]
        ours = [(t, c) for t, c in candidates if is_ours(c)]
        data["best"][bw] = min(candidates)[1] if candidates else None
        data["best_ours"][bw] = min(ours)[1] if ours else None
    for rec in digits.values():
        acc = rec.get("accuracy")
        rec["delta_points"] = None if acc is None or dense_acc is None or acc != acc else 100 * (acc - dense_acc)


def goal_lines(data: dict) -> list[str]:
    """Every goal, met or not, with the figures it is judged on."""
    steps, digits = data["steps"], data["digits"]
    floor = data.get("floor_together_s") or data["floor_s"]
    floor_name = "the floor of the ranks computing together" if data.get("floor_together_s") else "the 1-process floor"
    out = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    def step(bw: str, cfg: str) -> float | None:
        return steps.get(bw, {}).get(cfg, {}).get("median_s")

    def speed(bw: str, cfg: str) -> float | None:
        dense, t = step(bw, "dense"), step(bw, cfg)
        return dense / t if dense and t else None

    for cfg in (SIGN_EF, TOPK_EF):
        dense, t = step("none", "dense"), step("none", cfg)
        ok = None if not (dense and t) else t <= dense
        figures = f"{1000 * t:.0f} ms vs dense {1000 * dense:.0f} ms" if dense and t else "not measured"
        out.append(f"- unthrottled, {label_of(cfg)} no slower than dense: {figures}: {verdict(ok)}.")
    for cfg in (SIGN_EF, TOPK_EF):
        t, s = step("1gbit", cfg), speed("1gbit", cfg)
        if t is None:
            out.append(f"- 1 Gbit/s, {label_of(cfg)}: not measured.")
            continue
        out.append(f"- 1 Gbit/s, {label_of(cfg)}: {1000 * t:.0f} ms = {t / floor:.2f}x {floor_name} "
                   f"({1000 * floor:.0f} ms; goal <= {GOAL_FLOOR_1G:g}x: {verdict(t / floor <= GOAL_FLOOR_1G)}), "
                   f"{s or float('nan'):.1f}x faster than dense (goal >= {GOAL_SPEEDUP_1G:g}x: "
                   f"{verdict(None if s is None else s >= GOAL_SPEEDUP_1G)}).")  # fmt: skip
    ds, ef = step("1gbit", SIGN_DS), step("1gbit", SIGN_EF)
    if ds and ef:
        out.append(f"- 1 Gbit/s, sign+DoubleSqueeze {1000 * ds:.0f} ms = {ds / ef:.2f}x sign+ef's step "
                   f"(goal <= {GOAL_DS_VS_EF:g}x: {verdict(ds / ef <= GOAL_DS_VS_EF)}).")  # fmt: skip
    s = speed("100mbit", TOPK_EF)
    out.append(f"- 100 Mbit/s, {label_of(TOPK_EF)}: " + (
        f"{s:.1f}x faster than dense (goal >= {GOAL_SPEEDUP_100M:g}x: {verdict(s >= GOAL_SPEEDUP_100M)})."
        if s else "not measured."))  # fmt: skip
    dense_acc = digits.get("dense", {}).get("accuracy")
    if dense_acc is not None:
        for cfg, rec in digits.items():
            if is_ours(cfg) and rec.get("delta_points") is not None:
                ok = rec["delta_points"] >= -GOAL_ACC_POINTS
                out.append(f"- digits accuracy, {label_of(cfg)}: {fmt_delta(rec)} (goal within {GOAL_ACC_POINTS:g} "
                           f"point: {verdict(ok)}).")  # fmt: skip
    return out


def fmt_delta(rec: dict) -> str:
    acc, d = rec.get("accuracy"), rec.get("delta_points")
    if acc is None:
        return "not measured"
    if acc != acc:
        return "diverged"
    return f"{100 * acc:.2f}% ({d:+.2f} points vs dense)" if d is not None else f"{100 * acc:.2f}%"


def write_markdown(data: dict, path: Path) -> None:
    m, args = data["machine"], data["args"]
    floor = data["floor_s"]
    lines = [
        "# Step time and accuracy on a throttled network",
        "",
        f"Command: `{data['command']}` (total wall time {data['wall_s'] / 60:.1f} min)."
        + (f" This page and the plots were re-rendered from its `network.json` with `python benchmarks/network.py "
           f"--from-json {data['rendered_from']}` (same numbers)." if data.get("rendered_from") else ""),
        "",
        "## Machine",
        "",
        f"- `{m['uname']}`",
        f"- CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (CPU), Python {m['python']}; load average "
        f"at start {', '.join(f'{x:.2f}' for x in data['load_start'])}, at end {', '.join(f'{x:.2f}' for x in m['loadavg'])} "
        "(the machine is shared and noisy: medians, and ratios against baselines from the same run).",
        f"- {data['world']} gloo ranks, one process each, `OMP_NUM_THREADS=1` and `torch.set_num_threads(1)`.",
        f"- Network: {data['mode']}.",
    ]
    if data.get("fallback"):
        lines.append(f"- **Throttling unavailable**: {data['fallback']}; only the unthrottled host loopback was measured.")
    if args.get("model", "mlp") == "blocks":
        shape = "20 pre-norm residual blocks of width 320 and a head, 242 tensors (benchmarks/_models.py)"
        what = "a block stack"
    else:
        shape = ("quick: 256-512-256-512" if args["quick"] else
                 "Linear 2048->4096, 4096->2048, 2048->4096 with ReLUs, as in bytes_per_step.py")  # fmt: skip
        what = "an MLP"
    lines += [
        "",
        "## Workloads",
        "",
        f"- **Step time**: {what} of {data['params'] / 1e6:.2f}M parameters "
        f"({shape}), "
        f"per-rank batch {args['batch']} of random inputs with random labels, cross-entropy, SGD (momentum 0.9; ours move it into the exchange); a step is "
        "zero_grad + forward + backward (the exchange runs inside) + optimizer step. "
        + ("Every DDP model (dense, PyTorch's hooks, ours) is built with `gradient_as_bucket_view=True` (gradients "
           "are views into DDP's buckets: one copy fewer per step for all of them). " if args.get("bucket_view") else "")
        + f"{args['warmup']} warm-up steps, then K timed steps with K = ceil({args['target_seconds']:g} s / last warm-up step) "
        f"clamped to [{args['min_steps']}, {args['max_steps']}]. A step's time is the slowest rank's; the table gives the "
        "median over the timed steps.",
        "- **Floor**: the same model and per-rank batch in one process, no DDP, no communication ("
        + ("measured at the start and at the end of the run; median of all their timed steps" if len(data["floor_runs"]) > 1
           else "measured once") + f": {1000 * floor:.0f} ms); every 'x floor' is against it."
        + (f" A second row runs {data['world']} such processes at once (still no communication), as the ranks share the "
           "machine (and its other jobs): the gap between the two is contention, not communication."
           if data.get("floor_together_s") else ""),
        (f"- **Accuracy**: `examples/ddp_digits.py`'s digits MLP (64-{args['digits_hidden']}-{args['digits_hidden']}-10), "
         f"{args['epochs']} epochs, batch 32 per rank, SGD lr 0.05 momentum 0.9 (ours: the momentum moved into the "
         f"exchange, as `momentum='auto'` does), seed 0, {data['world']} ranks, trained once per configuration in the "
         f"{data['digits_bw']} run (accuracy does not depend on bandwidth)." if data.get("digits_bw") else
         "- **Accuracy**: not measured in this run (`--no-digits`)."),
        "- **Bytes on the wire** (what one rank sends per step): lightning_compress: `state.stats.sent_bytes_last_step` "
        "(mean over the timed steps); dense: 4 bytes x parameters x 2(n-1)/n (ring allreduce); fp16 hook: "
        "2 bytes x parameters x 2(n-1)/n; PowerSGD: each gradient is viewed as an n x m matrix and, where PyTorch's "
        "`_should_compress` says so (n m > 2 r (n+m)), its P (n x r) and Q (m x r) are allreduced in fp32, the rest "
        "(biases) densely: 4 bytes x (sum r(n+m) + uncompressed elements) x 2(n-1)/n. The formula for the PyTorch hooks "
        "was checked against the input bytes of every `dist.all_reduce` they made during the timed steps "
        "(`counted_sent` in network.json).",
        f"- GraVAC: `attach_gravac(state, {', '.join(f'{k}={v}' for k, v in GRAVAC.items())})` on `compressor=topk,feedback=ef`; "
        "CF = compression factor sent (1 = dense).",
        "",
    ]
    for bw in data["bandwidths"]:
        rate = data["rates"][bw]
        rows = data["steps"][bw]
        lines += [f"## {pretty_rate(rate)}", ""]
        if data["qdiscs"].get(bw):
            lines += [f"qdiscs: {'; '.join(data['qdiscs'][bw])}", ""]
        lines += [
            "| config | median step ms | bytes/step on the wire | speedup vs dense | x floor | digits accuracy | notes |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| {label_of('floor')} | {1000 * floor:.0f} | 0 | "
            f"{(rows.get('dense', {}).get('median_s') or float('nan')) / floor:.2f} | 1.00 | - | the floor of every ratio |",
        ]
        if data.get("floor_together_s"):
            ft = data["floor_together_s"]
            lines.append(f"| compute only, {data['world']} processes at once | {1000 * ft:.0f} | 0 | "
                         f"{(rows.get('dense', {}).get('median_s') or float('nan')) / ft:.2f} | {ft / floor:.2f} | - | "
                         "no communication; shows what sharing the machine costs |")
        for cfg in data["configs"]:
            rec = rows.get(cfg, {})
            dig = data["digits"].get(cfg, {})
            acc = "failed" if dig.get("error") else fmt_delta(dig)
            notes = []
            if rec.get("error"):
                notes.append(f"**failed**: {short_error(rec['error'])}")
            if dig.get("error") and not rec.get("error"):
                notes.append(f"digits failed: {short_error(dig['error'])}")
            if rec.get("steps"):
                notes.append(f"{len(rec['steps'])} timed steps")
            if rec.get("cf"):
                notes.append(f"mean CF {statistics.fmean(rec['cf']):.1f} (steps: {fmt_cf(rec['cf'])})")
            if rec.get("ratio"):
                notes.append(f"ratio {rec['ratio']:.1f}x")
            if data.get("args", {}).get("nodes") and rec.get("across_per_step") is not None:
                notes.append(f"{mb(rec['across_per_step'])} of it by collectives that may cross nodes")
            if rec.get("median_s") is None:
                lines.append(f"| {label_of(cfg)} | - | - | - | - | {acc} | {'; '.join(notes)} |")
                continue
            lines.append(
                f"| {label_of(cfg)} | {1000 * rec['median_s']:.0f} | {mb(rec.get('sent_per_step'))} | "
                f"{rec['speedup']:.2f}x | {rec['x_floor']:.2f} | {acc} | {'; '.join(notes)} |"
                if rec.get("speedup") is not None else
                f"| {label_of(cfg)} | {1000 * rec['median_s']:.0f} | {mb(rec.get('sent_per_step'))} | - | "
                f"{rec['x_floor']:.2f} | {acc} | {'; '.join(notes)} |"
            )  # fmt: skip
        lines.append("")
    lines += ["## Goals", ""] + goal_lines(data) + [""]
    lines += ["## Digits accuracy and bytes", "",
              "| config | test accuracy | vs dense | bytes sent over the run (rank 0) | steps | notes |",
              "|---|---:|---:|---:|---:|---|"] if data.get("digits_bw") else []  # fmt: skip
    for cfg in data["configs"] if data.get("digits_bw") else ():
        d = data["digits"].get(cfg, {})
        if d.get("error") or d.get("accuracy") is None:
            lines.append(f"| {label_of(cfg)} | failed | - | - | - | {short_error(d.get('error', 'not run'))} |")
            continue
        note = f"mean CF {statistics.fmean(d['cf']):.1f} ({fmt_cf(d['cf'])})" if d.get("cf") else ""
        delta = "-" if d.get("delta_points") is None else f"{d['delta_points']:+.2f}"
        acc = "diverged" if d["accuracy"] != d["accuracy"] else f"{100 * d['accuracy']:.2f}%"
        lines.append(f"| {label_of(cfg)} | {acc} | {delta} | {mb(d['sent_total'])} | {d['steps']} | {note} |")
    lines += [""] + split_lines(data) + [""] + notes_lines(data)
    path.write_text("\n".join(lines) + "\n")


def fmt_cf(cfs: list[float]) -> str:
    counts: dict[float, int] = {}
    for c in cfs:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{'dense' if c == 1 else f'CF {c:g}'} x{n}" for c, n in sorted(counts.items()))


def split_lines(data: dict) -> list[str]:
    floor = data["floor_s"]
    out = [
        "## Where the time of the best configuration goes",
        "",
        "Method A (any configuration): compute = the floor; compression = the same configuration on a 1-rank "
        "process group (DDP and the hook run in full, the collectives return at once: nothing travels) minus the "
        "floor; communication = the 2-rank median at that bandwidth minus the 1-rank median. Method B "
        "(lightning_compress only, same run as the table), from the state's timers: compression = median(encode "
        "on the hook's thread + decode in the completion callbacks), communication = median(time the hook's "
        "thread waited for collectives: later passes and the drain at the last bucket; transfers that overlap "
        "backward cost nothing here), the rest of the step = compute (forward, backward, optimizer, DDP "
        "bookkeeping).",
        "",
        "| bandwidth | best config | step ms | A: compute | A: compression | A: communication "
        "| B: compute | B: compression | B: communication |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bw in data["bandwidths"]:
        for cfg in dict.fromkeys([data["best"].get(bw), data["best_ours"].get(bw)]):
            if cfg is None:
                continue
            rec = data["steps"][bw][cfg]
            one = data["one_rank"].get(cfg, {})
            step = rec["median_s"]
            if one.get("median_s") is not None:
                a = (f"{1000 * floor:.0f} | {1000 * (one['median_s'] - floor):.0f} | "
                     f"{1000 * (step - one['median_s']):.0f}")  # fmt: skip
            else:
                a = f"- | - | - ({short_error(one.get('error', 'not measured'), 80)})"
            if rec.get("hook_s"):
                hook = statistics.median(rec["hook_s"])
                comm = statistics.median(rec["comm_s"])
                comp = statistics.median(h - c for h, c in zip(rec["hook_s"], rec["comm_s"]))
                b = f"{1000 * (step - hook):.0f} | {1000 * comp:.0f} | {1000 * comm:.0f}"
            else:
                b = "- | - | -"
            out.append(f"| {pretty_rate(data['rates'][bw])} | {label_of(cfg)} | {1000 * step:.0f} | {a} | {b} |")
    out += ["", "All in ms; each row's best configuration is the fastest one at that bandwidth (overall, then of "
            "lightning_compress). Method A's compression includes DDP's and the hook's fixed costs; with 2 ranks on "
            "2 cores both ranks compute at the same time, while the floor and the 1-rank runs have the machine "
            "to themselves, so part of the contention shows up as 'communication' in A (and as compute or "
            "compression in B); A subtracts medians of different runs, so on this noisy machine a small part can "
            "come out negative."]  # fmt: skip
    return out


def notes_lines(data: dict) -> list[str]:
    out = ["## Notes", ""]
    if data["mode"].startswith("shared"):
        out.append("- Shared loopback: both ranks' traffic passes the one `tbf` on `lo`, so the nominal rate is "
                   "shared by all ranks: in a 2-rank ring allreduce each rank sends and receives its gradient at "
                   "about half the rate at once, which is what a half-duplex link of that rate would do. With "
                   "`--veth` each direction of each rank's link has the full rate (full duplex), so dense steps at "
                   "a given rate take about half as long there.")  # fmt: skip
    out.append("- tbf burst = max(128 KiB, rate/250) bytes: 4 ms of tokens at the rate (a kernel timer tick at "
               "HZ=250), and at least two full loopback packets: `lo` has a 65536-byte MTU (plus a 14-byte header), "
               "and tbf drops every packet larger than its bucket, so with a 64 KiB bucket TCP resends the same "
               "packet forever and the run stalls (seen at 100 Mbit/s, where rate/250 is only 50 kB). "
               "`latency 50ms` bounds the queue (rate x 50 ms + burst).")  # fmt: skip
    out.append("- PowerSGD (`powerSGD_hook`, `PowerSGDState(process_group=None, matrix_approximation_rank=2, "
               "start_powerSGD_iter=2)`, error feedback and warm start on): on gloo the plain hook can abort "
               "with gloo's \"Received data size doesn't match expected size\": it issues the Q allreduce from a "
               "future callback (a gloo thread) while the backward pass issues the next bucket's collectives, so "
               "the ranks can enqueue collectives in different orders. `powersgd_r2_sync` is the same hook waited "
               "for inside the hook (each bucket's exchange finishes before the next starts), which keeps one order "
               "on every rank. lightning_compress's hook returns before its exchange completes, but issues every "
               "collective from the thread that calls the hook, so its order is the same on every rank.")  # fmt: skip
    if data.get("args", {}).get("nodes"):
        out.append("- Nodes: `hierarchical=true` sums the compressed tensors in fp32 inside a node (all_to_all of "
                   "shards, then all_gather of the averaged shards, over the node's unthrottled loopback) and sends "
                   "only one compressed shard per rank across nodes; 'may cross nodes' counts what a rank sends by its "
                   "cross-node group and by collectives over all ranks (the biases' sums). For the flat exchange it is "
                   "everything the rank sends, of which the part addressed to ranks of its own node stays on the "
                   "loopback. Ranks get torchrun's LOCAL_WORLD_SIZE and LOCAL_RANK.")  # fmt: skip
    out.append("- Bytes for lightning_compress include its dense exchange of the biases (1-D tensors) and, for "
               "DoubleSqueeze, both passes (all_to_all + all_gather); GraVAC adds one 32-byte all_gather per step.")
    return out


def plot_step_time(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [data["rates"][b] for b in data["bandwidths"] if data["rates"][b] is not None]
    top = max(finite) if finite else 1e9
    xs = {b: (data["rates"][b] if data["rates"][b] is not None else top * 10) for b in data["bandwidths"]}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "os^vD<>ph*x+"
    for i, cfg in enumerate(data["configs"]):
        pts = [(xs[b] / 1e6, 1000 * data["steps"][b][cfg]["median_s"]) for b in data["bandwidths"]
               if data["steps"][b].get(cfg, {}).get("median_s")]  # fmt: skip
        if not pts:
            continue
        pts.sort()
        style = "-" if is_ours(cfg) else "--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=markers[i % len(markers)], color=f"C{i % 10}",
                label=cfg if is_ours(cfg) else label_of(cfg))  # fmt: skip
    ax.axhline(1000 * data["floor_s"], color="black", linestyle=":", label="compute-only floor (1 process)")
    if data.get("floor_together_s"):
        ax.axhline(1000 * data["floor_together_s"], color="gray", linestyle="-.",
                   label=f"compute only, {data['world']} processes at once")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(xs.values())
    ax.set_xticks([t / 1e6 for t in ticks])
    ax.set_xticklabels([pretty_rate(data["rates"][b]).replace(" ", "\n") for b in sorted(xs, key=xs.get)])
    ax.set_xlabel(f"bandwidth ({data['mode'].split(':')[0]})")
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{data['params'] / 1e6:.1f}M-parameter MLP, {data['world']} gloo ranks, batch {data['args']['batch']}/rank",
                 fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_bytes(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "os^vD<>ph*x+"
    for i, cfg in enumerate(data["configs"]):
        d = data["digits"].get(cfg, {})
        name = cfg if is_ours(cfg) else label_of(cfg)
        marker, color = markers[i % len(markers)], f"C{i % 10}"
        if d.get("accuracy") is None or d["accuracy"] != d["accuracy"] or not d.get("sent_total"):
            why = "diverged" if d.get("accuracy") is not None else "failed"
            ax.scatter([], [], marker=marker, color=color, label=f"{name} ({why}, not shown)")
            continue
        ax.scatter(d["sent_total"], 100 * d["accuracy"], marker=marker, color=color, s=60, label=name,
                   edgecolors="black" if is_ours(cfg) else "none")  # fmt: skip
    dense = data["digits"].get("dense", {}).get("accuracy")
    if dense is not None and dense == dense:
        ax.axhline(100 * dense - GOAL_ACC_POINTS, color="gray", linestyle=":", label="dense - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent by one rank over the whole digits run (log)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"digits, {data['args']['epochs']} epochs, {data['world']} ranks (black edge: lightning_compress)",
                 fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="default configs:\n  " + "\n  ".join(DEFAULT_CONFIGS))  # fmt: skip
    p.add_argument("--bandwidths", default=None, help=f"comma-separated tc rates or 'none' (default {DEFAULT_BANDWIDTHS}; "
                   "--quick: 1gbit)")  # fmt: skip
    p.add_argument("--ranks", type=int, default=2, help="number of ranks")
    p.add_argument("--veth", action="store_true", help="one namespace per rank, joined by veth links")
    p.add_argument("--nodes", type=int, default=0, help="with --veth: one namespace per node of ranks/NODES ranks, "
                   "loopback inside a node (unthrottled), throttled veths between nodes")  # fmt: skip
    p.add_argument("--name", default="network", help="stem of the output files (default network: network.md, ...)")
    p.add_argument("--configs", default=None, help="';'-separated: dense, fp16, powersgd_r<R>[_sync], "
                   "'compressor=...,...', 'gravac:compressor=...'")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small model, 1 bandwidth, few steps and epochs (smoke check)")
    p.add_argument("--no-digits", action="store_true", help="step times only (no digits accuracy runs)")
    p.add_argument("--model", default="mlp", choices=("mlp", "blocks"),
                   help="step-time workload: the 25.2M MLP (6 tensors) or the 24.8M block stack (242 tensors)")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch of the MLP")
    p.add_argument("--bucket-view", action="store_true",
                   help="every DDP of the step-time runs (dense, PyTorch's hooks, ours) with gradient_as_bucket_view=True")
    p.add_argument("--epochs", type=int, default=None, help="digits epochs (default 20; --quick: 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --quick: a temp dir)")
    p.add_argument("--from-json", type=Path, default=None, metavar="NETWORK_JSON",
                   help="measure nothing: rewrite network.md and the plots from a saved network.json (into --out, "
                   "default: the JSON's folder)")  # fmt: skip
    args = p.parse_args(argv)
    if args.from_json:
        return args
    args.bandwidths = [b.strip() for b in (args.bandwidths or ("1gbit" if args.quick else DEFAULT_BANDWIDTHS)).split(",")]
    args.rates = {}
    for b in args.bandwidths:
        try:
            args.rates[b] = parse_rate(b)
        except ValueError as err:
            p.error(str(err))
    configs = args.configs.split(";") if args.configs else (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    args.configs = [c.strip() for c in configs if c.strip()]
    if "dense" not in args.configs:
        args.configs.insert(0, "dense")  # the baseline of every ratio
    for c in args.configs:
        if c in ("dense", "fp16") or re.fullmatch(r"powersgd_r\d+(_sync)?", c) or c in DEFAULT_CONFIGS:
            continue  # (the built-in ones are known to be valid: spare the 4 s import of Lightning)
        try:
            from lightning_compress import CompressionConfig

            CompressionConfig.from_string(c.removeprefix("gravac:"))
        except (ValueError, TypeError) as err:
            p.error(f"bad config {c!r}: {err}")
    if args.ranks < 2:
        p.error("--ranks must be >= 2")
    if args.nodes and (not args.veth or args.nodes < 2 or args.ranks % args.nodes or args.nodes == args.ranks):
        p.error(f"--nodes {args.nodes}: needs --veth, at least 2 nodes, and nodes of 2 or more ranks that divide "
                f"--ranks {args.ranks}")  # fmt: skip
    args.epochs = args.epochs or (2 if args.quick else 20)
    args.warmup = 2 if args.quick else 3
    args.target_seconds = 1.0 if args.quick else 10.0
    args.min_steps = 3
    args.max_steps = 5 if args.quick else 15
    args.digits_hidden = 256
    return args


def write_reports(data: dict, out_dir: Path) -> None:
    name = data.get("args", {}).get("name", "network")
    write_markdown(data, out_dir / f"{name}.md")
    plot_step_time(data, out_dir / f"{name}_step_time.png")
    if any(rec.get("accuracy") is not None for rec in data["digits"].values()):
        plot_accuracy_bytes(data, out_dir / f"{name}_accuracy_bytes.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        data["rendered_from"] = os.path.relpath(args.from_json, ROOT) if args.from_json.is_absolute() else str(args.from_json)
        summarize(data)
        out_dir = args.out or args.from_json.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        write_reports(data, out_dir)
        print("\n".join(goal_lines(data)) + f"\n\nwrote {out_dir / 'network.md'} and the plots from {args.from_json}")
        return 0
    t_start = time.monotonic()
    load_start = os.getloadavg()
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="lcbench_quick_")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/network.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")

    why_not = netns_capability()
    nets: Namespaces | None = None
    fallback = None
    if why_not is not None:
        fallback = why_not
        print(f"WARNING: {why_not}.\nWARNING: no throttling possible: measuring unthrottled on the host loopback only.",
              flush=True)  # fmt: skip
        args.bandwidths, args.rates = ["none"], {"none": None}
        mode = "host loopback, unthrottled (no namespaces)"
    else:
        gone = delete_leftovers()
        if gone:
            print(f"deleted leftover namespaces: {', '.join(gone)}", flush=True)
        nets = Namespaces()
        atexit.register(nets.cleanup)

        def on_signal(signum, frame):
            print(f"\n{signal.Signals(signum).name}: cleaning up namespaces", flush=True)
            nets.cleanup()
            sys.exit(128 + signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        mode = (f"veth, one namespace per rank ({'veth pair' if args.ranks == 2 else 'veths to a bridge'}, "
                "both ends throttled)" if args.veth else
                "shared loopback: all ranks in one namespace, one tbf on its lo")  # fmt: skip
        if args.nodes:
            mode = (f"veth nodes: {args.nodes} namespaces of {args.ranks // args.nodes} ranks each, loopback inside a "
                    f"node (unthrottled), {'a veth pair' if args.nodes == 2 else 'veths to a bridge'} between nodes "
                    "(both ends throttled)")  # fmt: skip

    # Accuracy does not depend on bandwidth: digits ride along with the least throttled run.
    digits_bw = None if args.no_digits else max(args.bandwidths, key=lambda b: math.inf if args.rates[b] is None else args.rates[b])
    data = {
        "command": command, "args": {k: v for k, v in vars(args).items() if k not in ("out", "rates")},
        "world": args.ranks, "mode": mode, "fallback": fallback, "bandwidths": args.bandwidths, "rates": args.rates,
        "configs": args.configs, "digits_bw": None if digits_bw is None else pretty_rate(args.rates[digits_bw]), "load_start": load_start,
        "steps": {}, "digits": {}, "qdiscs": {}, "one_rank": {}, "best": {}, "best_ours": {},
    }  # fmt: skip
    logdir = Path(tempfile.mkdtemp(prefix="lcbench_logs_"))
    runner = Runner(args, nets, logdir)
    print(f"network benchmark: {args.ranks} ranks, {mode}; bandwidths {', '.join(args.bandwidths)}; "
          f"{len(args.configs)} configs; logs in {logdir}", flush=True)  # fmt: skip
    try:
        floor1 = measure_floor(runner, args)
        data["params"] = floor1["params"]
        print(f"floor (1 process, no communication): {1000 * floor1['median_s']:.0f} ms/step", flush=True)

        for bw in args.bandwidths:
            rate = args.rates[bw]
            tag = re.sub(r"[^a-z0-9]", "", bw.lower())
            if nets is None:
                topo = host_topology(args.ranks)
            else:
                topo = nets.veth(tag, rate, args.ranks, args.nodes) if args.veth else nets.shared(tag, rate, args.ranks)
            data["qdiscs"][bw] = topo.qdiscs
            rows = data["steps"][bw] = {}
            print(f"\n== {pretty_rate(rate)}: {topo.description}" + (f"; {'; '.join(topo.qdiscs)}" if topo.qdiscs else ""),
                  flush=True)  # fmt: skip
            with_digits = bw == digits_bw

            def report(cfg, recs, error, bw=bw, rows=rows, with_digits=with_digits):
                rec, err = merge_step(recs)
                # A rank's crash (error from its log) is the cause; its peers' errors follow from it.
                rows[cfg] = rec if rec is not None else {"error": error or err or "no result"}
                if rec is not None and rec.get("wire_formula") is not None and rec.get("handed_per_step") is not None:
                    rec["counted_sent"] = rec["sent_per_step"]
                    rec["sent_per_step"] = rec["wire_formula"]  # the formula (issue); the count is kept
                if with_digits:
                    drec, derr = merge_step(recs, "digits")
                    if drec is None and rec is not None:
                        derr = error or derr or "no result"
                    data["digits"][cfg] = drec if drec is not None else {
                        "error": derr or "not run: the step measurement of this configuration failed"}
                dense = rows.get("dense", {}).get("median_s")
                if rec is not None:
                    msg = (f"{1000 * rec['median_s']:8.0f} ms/step  {mb(rec.get('sent_per_step')):>10}/step  "
                           f"{dense / rec['median_s'] if dense else float('nan'):6.1f}x vs dense  "
                           f"{rec['median_s'] / floor1['median_s']:5.2f}x floor  ({len(rec['steps'])} steps)")  # fmt: skip
                    if rec.get("cf"):
                        msg += f"  mean CF {statistics.fmean(rec['cf']):.1f}"
                else:
                    msg = f"FAILED: {short_error(rows[cfg]['error'], 200)}"
                if with_digits:
                    d = data["digits"][cfg]
                    msg += (f"  digits {100 * d['accuracy']:.2f}%" if d.get("accuracy") is not None
                            else f"  digits FAILED: {short_error(d.get('error', ''), 120)}")  # fmt: skip
                wall = max(((r or {}).get("wall_s") or 0.0) for r in recs)
                print(f"  {cfg:<48} {msg}  [{wall:.0f} s]", flush=True)

            wargs = ["--mode", "step", *worker_common(args)] + (["--digits"] if with_digits else [])
            timeout = (900 if rate is not None and rate < 5e8 else 400) + (120 if with_digits else 0)
            runner.run(topo, args.ranks, args.configs, wargs, timeout=timeout, on_done=report)
            if nets is not None:
                nets.remove([ns for ns in dict.fromkeys(topo.namespaces) if ns] + [n for n in nets.created if n.endswith(f"_{tag}_hub")])

        # Floor again (noise), then the 1-rank runs of the best configurations (time split, method A).
        floors = [floor1] if args.quick else [floor1, measure_floor(runner, args)]
        data["floor_runs"] = floors
        data["floor_s"] = statistics.median(t for f in floors for t in f["steps"])
        print(f"\nfloor again: {1000 * floors[-1]['median_s']:.0f} ms/step; floor used: {1000 * data['floor_s']:.0f} ms",
              flush=True)  # fmt: skip
        if not args.quick:
            together = measure_floor(runner, args, procs=args.ranks)
            data["floor_together_s"] = together["median_s"]
            print(f"floor, {args.ranks} processes at once (no communication): {1000 * together['median_s']:.0f} ms/step "
                  "(slowest per step)", flush=True)  # fmt: skip
        summarize(data)
        best = dict.fromkeys(c for bw in args.bandwidths for c in (data["best"][bw], data["best_ours"][bw]) if c)
        got = runner.run(host_topology(1), 1, list(best), ["--mode", "step", *worker_common(args)], timeout=300)
        for cfg, (recs, error) in got.items():
            rec, err = merge_step(recs)
            data["one_rank"][cfg] = rec if rec is not None else {"error": err or error or "no result"}
            print(f"1-rank run of {cfg}: " + (f"{1000 * rec['median_s']:.0f} ms/step" if rec else
                                              f"FAILED {data['one_rank'][cfg]['error']}"), flush=True)  # fmt: skip
    finally:
        if nets is not None:
            nets.cleanup()
            left = [n for n in list_namespaces() if n.startswith(f"{PREFIX}{os.getpid()}_")]
            print(f"namespaces left behind: {left or 'none'}", flush=True)

    data["machine"] = machine()
    data["wall_s"] = time.monotonic() - t_start
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=1, default=str))
    write_reports(data, out_dir)
    print("\n" + "\n".join(goal_lines(data)))
    print(f"\nwrote {out_dir / args.name}.md, .json, _step_time.png, _accuracy_bytes.png "
          f"({data['wall_s'] / 60:.1f} min)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
