"""What the benchmarks write about the machine they ran on, and a free port for their ranks."""

from __future__ import annotations

import socket


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), or ``None``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
