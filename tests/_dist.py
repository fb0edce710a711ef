"""Launch a function on several gloo ranks; assertions run inside the workers."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = 300  # seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, collective_timeout: float, quiet: bool, fn, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if quiet:
        warnings.simplefilter("ignore", UserWarning)
    # A collective that never completes fails the test after this long instead of gloo's 30 minutes.
    timeout = datetime.timedelta(seconds=collective_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        # Print here: the peer may be blocked in a collective, and tearing the group down
        # under it can abort this process before mp.spawn reports the error.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(
    fn,
    *args,
    world_size: int = 2,
    timeout: float = 900.0,
    collective_timeout: float = COLLECTIVE_TIMEOUT,
    quiet: bool = True,
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; a failure in any rank raises.

    Ranks still running after ``timeout`` seconds are killed and the call raises ``TimeoutError``;
    a collective fails after ``collective_timeout`` seconds. ``quiet``: the ranks ignore UserWarnings.
    """
    entry_args = (world_size, free_port(), collective_timeout, quiet, fn, args)
    context = mp.start_processes(_entry, args=entry_args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2.0):  # raises as soon as a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks ran past {timeout:.0f} s")


def gather_flat(tensors) -> list[torch.Tensor]:
    """All ranks' concatenation of ``tensors`` (flattened, detached)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out
