"""The compression flag: ``ACCELERATE_COMPRESSION``, the YAML ``compression:`` section and launcher options.

One setting, three spellings: the inline form ``"compressor=sign,feedback=doublesqueeze"``, a path to a
YAML file (a top-level ``compression:`` section, or a flat mapping of
:class:`~lightning_compress.CompressionConfig` fields), or the ``compression:`` section of an
``accelerate launch --config_file`` YAML (read and stripped by ``accelerate-compress launch``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lightning_compress.config import CompressionConfig

__all__ = ["ADAPTIVE", "ENV_VAR", "SECTION", "config_from_env", "parse_setting", "resolve", "to_inline"]

ENV_VAR = "ACCELERATE_COMPRESSION"
SECTION = "compression"
# Adaptive control of the compression factor. Only "none" exists today; "gravac" is planned,
# and asking for it must fail loudly rather than train without the controller the user expects.
ADAPTIVE = ("none",)


def _check_adaptive(value: Any) -> None:
    if value not in ADAPTIVE:
        planned = " ('gravac' is planned but not available yet)" if value == "gravac" else ""
        raise ValueError(f"`adaptive` must be one of {ADAPTIVE}; got {value!r}{planned}")


def _split_adaptive(values: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values)  # never mutate the caller's mapping
    if "adaptive" in values:
        _check_adaptive(values.pop("adaptive"))
    return values


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"compression file {path!r} must hold a mapping; got {type(data).__name__}")
    section = data[SECTION] if SECTION in data else data
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"`{SECTION}` in {path!r} must be a mapping of option: value; got {section!r}")
    return dict(section)


def _string_values(text: str) -> dict[str, Any]:
    """``"k=v,..."`` to validated field values (``adaptive`` checked and dropped)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    rest, adaptive = [], None
    for item in items:
        key, _, raw = item.partition("=")
        if key.strip() == "adaptive":
            adaptive = raw.strip()
        else:
            rest.append(item)
    if adaptive is not None:
        _check_adaptive(adaptive)
    return CompressionConfig.from_string(",".join(rest)).to_dict() if rest else {}


def parse_setting(text: str) -> dict[str, Any]:
    """The options a flag value sets: inline ``"k=v,..."`` or a path to a YAML file.

    Raises:
        ValueError: an unknown option, a value outside what is allowed, or a missing file.
        TypeError: an option has the wrong type.
    """
    text = text.strip()
    if not text:
        return {}
    looks_like_file = text.endswith((".yaml", ".yml")) or (os.sep in text and "=" not in text)
    if looks_like_file or (os.path.isfile(text) and "=" not in text):
        if not os.path.isfile(text):
            raise ValueError(f"{ENV_VAR}: compression file {text!r} does not exist")
        values = _split_adaptive(_load_yaml(text))
        CompressionConfig.from_dict(values)  # validate now, naming the bad option
        return values
    return _string_values(text)


def resolve(*layers: Mapping[str, Any] | None) -> CompressionConfig:
    """A validated config from option layers, later layers overriding earlier ones (``None`` = not given)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update({k: v for k, v in _split_adaptive(layer).items() if v is not None})
    return CompressionConfig.from_dict(merged)


def config_from_env(environ: Mapping[str, str] | None = None) -> CompressionConfig | None:
    """The config ``ACCELERATE_COMPRESSION`` asks for, or ``None`` when it is unset or empty."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not text:
        return None
    return resolve(parse_setting(text))


def to_inline(config: CompressionConfig) -> str:
    """The inline ``"k=v,..."`` form of every field, which :func:`parse_setting` reads back exactly."""
    parts = []
    for key, value in config.to_dict().items():
        parts.append(f"{key}={'none' if value is None else repr(value) if isinstance(value, float) else value}")
    return ",".join(parts)
