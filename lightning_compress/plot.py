"""Plot a run's compression metrics from its own logs: ``python -m lightning_compress.plot LOGS -o run.png``.

``LOGS`` is a CSV file with a ``step`` column (Lightning's and Fabric's ``CSVLogger`` write
``metrics.csv``), a TensorBoard event file, or a folder searched for both (the newest run's files).
It reads the metrics the :class:`~lightning_compress.CompressionMonitor`, ``accelerate_compress`` and the
GraVAC callback log and draws, against the step:

1. bytes this rank sent per step, and what dense DDP would have sent (``bytes_sent x ratio``);
2. the compression gain (``compression/gain``; GraVAC's ``gravac/gain`` when present);
3. ``compression/ratio`` (bytes on the wire) and GraVAC's ``gravac/cf`` (elements kept) when present.

Reading needs nothing beyond the standard library (event files are parsed here); drawing needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import os
import struct
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["main", "plot", "read_csv", "read_events", "read_logs"]

Series = dict[str, list[tuple[int, float]]]
_KEYS = ("bytes_sent", "ratio", "gain", "dense_bytes")


def read_csv(path: str | os.PathLike) -> Series:
    """``{metric: [(step, value), ...]}`` from a CSV with a ``step`` column (empty cells skipped)."""
    series: Series = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step", "")
            if step in ("", None):
                continue
            for key, value in row.items():
                if key == "step" or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return series


# ----- TensorBoard event files: TFRecords of Event protos, read with a small protobuf decoder ---------------
def _records(data: bytes) -> Iterator[bytes]:
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        at += 12  # length, its CRC
        yield data[at : at + length]
        at += length + 4  # payload, its CRC


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a protobuf message (bytes for length-delimited fields)."""
    at = 0
    while at < len(buf):
        key, at = _varint(buf, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = _varint(buf, at)
        elif kind == 1:
            value, at = buf[at : at + 8], at + 8
        elif kind == 2:
            length, at = _varint(buf, at)
            value, at = buf[at : at + length], at + length
        elif kind == 5:
            value, at = buf[at : at + 4], at + 4
        else:
            return
        yield number, kind, value


def _scalar(value: bytes) -> tuple[str, float] | None:
    """``(tag, value)`` of a ``Summary.Value`` holding ``simple_value`` or a one-element float tensor."""
    tag, number = None, None
    for field, kind, item in _fields(value):
        if field == 1 and kind == 2:
            tag = item.decode("utf-8", "replace")
        elif field == 2 and kind == 5:
            number = struct.unpack("<f", item)[0]
        elif field == 8 and kind == 2:  # TensorProto: float_val (5, packed) or tensor_content (4)
            for tfield, tkind, titem in _fields(item):
                if tfield == 5 and tkind == 2 and len(titem) >= 4:
                    number = struct.unpack_from("<f", titem)[0]
                elif tfield == 5 and tkind == 5:
                    number = struct.unpack("<f", titem)[0]
                elif tfield == 4 and tkind == 2 and len(titem) == 4:
                    number = struct.unpack("<f", titem)[0]
    return (tag, float(number)) if tag is not None and number is not None else None


def read_events(path: str | os.PathLike) -> Series:
    """``{tag: [(step, value), ...]}`` of the scalars in a TensorBoard event file."""
    series: Series = {}
    for record in _records(Path(path).read_bytes()):
        step, values = 0, []
        for field, kind, item in _fields(record):
            if field == 2 and kind == 0:
                step = item
            elif field == 5 and kind == 2:
                values.extend(v for f, k, v in _fields(item) if f == 1 and k == 2)
        for value in values:
            scalar = _scalar(value)
            if scalar is not None:
                series.setdefault(scalar[0], []).append((int(step), scalar[1]))
    return series


def read_logs(path: str | os.PathLike) -> Series:
    """The metrics of a CSV file, an event file, or a folder (every ``*.csv`` and event file under it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.rglob("*.csv"), *path.rglob("events.out.tfevents.*")], key=lambda p: p.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"no metrics.csv or TensorBoard event file under {str(path)!r}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    series: Series = {}
    for file in files:
        found = read_events(file) if "tfevents" in file.name else read_csv(file)
        for key, points in found.items():
            series.setdefault(key, []).extend(points)
    return {k: sorted(v) for k, v in series.items()}


def _pick(series: Series, suffix: str, prefix: str = "compression/") -> list[tuple[int, float]]:
    """The points of ``<prefix><suffix>``, or of any tag ending in ``/<suffix>`` under a custom prefix."""
    if prefix + suffix in series:
        return series[prefix + suffix]
    for key, points in series.items():
        if key.endswith("/" + suffix) and "/layer/" not in key and not key.startswith("gravac"):
            return points
    return []


def plot(series: Series, out: str | os.PathLike, title: str | None = None) -> Path:
    """Write the PNG (see the module docstring) and return its path.

    Raises:
        ValueError: ``series`` holds none of the compression metrics.
        RuntimeError: matplotlib is not installed.
    """
    sent, ratio, gain = _pick(series, "bytes_sent"), _pick(series, "ratio"), _pick(series, "gain")
    cf, gravac_gain = series.get("gravac/cf", []), series.get("gravac/gain", [])
    if not (sent or ratio or gain or cf):
        raise ValueError(
            "no compression metrics found (compression/bytes_sent, compression/ratio, compression/gain, gravac/cf); "
            f"the logs hold {sorted(series)[:12]}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing the plot needs matplotlib: pip install matplotlib") from None

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ratios = dict(ratio)
    dense = [(s, v * ratios[s]) for s, v in sent if s in ratios]
    panels = (
        ("bytes per step", (sent, "sent by this rank"), (dense, "dense DDP would send")),
        ("gain 1 - |C(v)-v|^2/|v|^2", (gain, "compression/gain"), (gravac_gain, "gravac/gain")),
        ("x fewer than dense", (ratio, "compression/ratio (bytes on the wire)"), (cf, "gravac/cf (elements kept)")),
    )
    for ax, (ylabel, solid, dashed) in zip(axes, panels):
        for (points, label), style in ((solid, "-"), (dashed, "--")):
            if points:
                ax.plot(*zip(*points), label=label, linestyle=style)
        if solid[0] or dashed[0]:
            ax.legend()
        ax.set_ylabel(ylabel)
    axes[2].set_xlabel("step")
    fig.suptitle(title or "compressed gradient exchange")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_compress.plot LOGS [-o out.png] [--title TEXT]``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_compress.plot", description=__doc__.split("\n")[0])
    parser.add_argument("logs", help="metrics.csv, a TensorBoard event file, or a folder holding them")
    parser.add_argument("-o", "--output", default="compression.png", help="the PNG to write (default compression.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        out = plot(read_logs(args.logs), args.output, args.title)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
