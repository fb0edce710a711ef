"""The compression flag: ``ACCELERATE_COMPRESSION``, the YAML ``compression:`` section and launcher options.

One setting, three spellings: the inline form ``"compressor=sign,feedback=doublesqueeze"``, a path to a
YAML file (a top-level ``compression:`` section, or a flat mapping of
:class:`~lightning_compress.CompressionConfig` fields), or the ``compression:`` section of an
``accelerate launch --config_file`` YAML (read and stripped by ``accelerate-compress launch``).

A setting that is given but empty -- an empty YAML file, an empty ``compression:`` section -- means the
:class:`~lightning_compress.CompressionConfig` defaults, under ``accelerate-compress launch`` as under
``accelerate_compress.enable()``; an unset or empty ``ACCELERATE_COMPRESSION`` gives no setting.

Adaptive control rides along: ``adaptive=gravac`` turns on GraVAC (compressor ``topk``, ``dgc`` or
``qsgd`` with ``feedback=ef``), and its parameters are ``gravac_<name>=value`` inline or a ``gravac:``
mapping in YAML, e.g. ``"compressor=topk,feedback=ef,adaptive=gravac,gravac_window=100"``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lightning_compress.config import CompressionConfig, build_config

__all__ = [
    "ADAPTIVE",
    "ENV_VAR",
    "GRAVAC_KEYS",
    "SECTION",
    "adaptive_from_env",
    "adaptive_options",
    "config_from_env",
    "parse_setting",
    "resolve",
    "to_inline",
]

ENV_VAR = "ACCELERATE_COMPRESSION"
SECTION = "compression"
# Adaptive control of the compression factor: "none", or GraVAC (lightning_compress.gravac).
ADAPTIVE = ("none", "gravac")
# GraVAC parameters: `gravac_<key>` in the inline and flat forms, or a `gravac:` mapping in YAML.
GRAVAC_KEYS = ("theta_min", "theta_max", "epsilon", "omega", "window", "scaling", "ewma")


def _check_adaptive(value: Any) -> None:
    if value not in ADAPTIVE:
        raise ValueError(f"`adaptive` must be one of {ADAPTIVE}; got {value!r}")


def _is_adaptive_key(key: str) -> bool:
    return key in ("adaptive", "gravac") or key.startswith("gravac_")


def _gravac_params(values: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    nested = values.get("gravac")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise ValueError(f"`gravac` must be a mapping of GraVAC parameters; got {nested!r}")
        params.update(nested)
    params.update({k[len("gravac_"):]: v for k, v in values.items() if k.startswith("gravac_")})
    unknown = sorted(set(params) - set(GRAVAC_KEYS))
    if unknown:
        raise ValueError(f"unknown GraVAC parameter(s) {unknown}; known: {GRAVAC_KEYS}")
    return params


def _split_adaptive(values: Mapping[str, Any]) -> dict[str, Any]:
    """The CompressionConfig fields of ``values``; adaptive settings are checked and left out."""
    if "adaptive" in values:
        _check_adaptive(values["adaptive"])
    _gravac_params(values)
    return {k: v for k, v in values.items() if not _is_adaptive_key(k)}


def adaptive_options(*layers: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """GraVAC keyword arguments from option layers (later override earlier), or ``None`` without GraVAC.

    Raises:
        ValueError: GraVAC parameters without ``adaptive=gravac``, or invalid ones.
    """
    adaptive, params = None, {}
    for layer in layers:
        if not layer:
            continue
        if layer.get("adaptive") is not None:
            _check_adaptive(layer["adaptive"])
            adaptive = layer["adaptive"]
        params.update({k: v for k, v in _gravac_params(layer).items() if v is not None})
    if adaptive != "gravac":
        if params:
            raise ValueError(f"GraVAC parameters {sorted(params)} are set but `adaptive` is {adaptive or 'none'!r}")
        return None
    from lightning_compress.gravac import GraVACController

    GraVACController(**params)  # validate now, naming the bad parameter
    return params


def _number(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{ENV_VAR}: compression file {path!r} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"compression file {path!r} must hold a mapping; got {type(data).__name__}")
    section = data[SECTION] if SECTION in data else data
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"`{SECTION}` in {path!r} must be a mapping of option: value; got {section!r}")
    return dict(section)


def _string_values(text: str) -> dict[str, Any]:
    """``"k=v,..."`` to validated values (CompressionConfig fields, ``adaptive``, ``gravac_*``)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    rest, adaptive = [], {}
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        if _is_adaptive_key(key):
            adaptive[key] = raw.strip() if key == "adaptive" or key == "gravac_scaling" else _number(raw.strip())
        else:
            rest.append(item)
    _split_adaptive(adaptive)
    values = CompressionConfig.from_string(",".join(rest)).to_dict() if rest else {}
    return {**values, **adaptive}


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
        values = _load_yaml(text)
        CompressionConfig.from_dict(_split_adaptive(values))  # validate now, naming the bad option
        return values
    return _string_values(text)


def resolve(*layers: Mapping[str, Any] | None) -> CompressionConfig:
    """A validated config from option layers, later layers overriding earlier ones (``None`` = not given)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update({k: v for k, v in _split_adaptive(layer).items() if v is not None})
    return build_config(None, **merged)


def config_from_env(environ: Mapping[str, str] | None = None) -> CompressionConfig | None:
    """The config ``ACCELERATE_COMPRESSION`` asks for, or ``None`` when it is unset or empty.

    A YAML file that is empty (or holds an empty ``compression:`` section) gives the defaults.
    """
    text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not text:
        return None
    return resolve(parse_setting(text))


def adaptive_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The GraVAC parameters ``ACCELERATE_COMPRESSION`` asks for, or ``None`` (no adaptive control)."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    return adaptive_options(parse_setting(text)) if text else None


def to_inline(config: CompressionConfig, adaptive: Mapping[str, Any] | None = None) -> str:
    """The inline ``"k=v,..."`` form of every field (and of GraVAC, when given), read back exactly by
    :func:`parse_setting`."""
    parts = []
    for key, value in config.to_dict().items():
        parts.append(f"{key}={'none' if value is None else repr(value) if isinstance(value, float) else value}")
    if adaptive is not None:
        parts.append("adaptive=gravac")
        parts.extend(f"gravac_{k}={repr(v) if isinstance(v, float) else v}" for k, v in adaptive.items())
    return ",".join(parts)
