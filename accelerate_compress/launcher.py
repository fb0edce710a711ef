"""``accelerate-compress launch``: ``accelerate launch`` with a compression setting, no change to the script.

Reads an optional ``compression:`` section from ``--config_file`` (Accelerate rejects unknown keys, so the
section is stripped and the rest handed to ``accelerate launch`` unchanged), applies ``ACCELERATE_COMPRESSION``
and the options on top -- one per :class:`~lightning_compress.CompressionConfig` field (``--compressor``,
``--density``, ``--bits``, ``--feedback``, ``--transport``, ``--warmup_steps``, ``--min_numel``, ``--block_size``,
``--seed``, ``--diana_alpha``, ``--ef21_step``, ``--dgc_sample_fraction``, ``--momentum``, ``--powersgd_rank``) plus ``--adaptive`` and ``--gravac``
(options win over the file, the file over the environment) -- validates the result before any worker starts, and
runs the script through :mod:`accelerate_compress._bootstrap`, which enables compression inside
``Accelerator.prepare_model``. The launcher says what was requested; rank 0 of the workers says what runs (or a
warning says that nothing is exchanged, e.g. when the processes do not form a process group).

Compression is on when any of these is given, even empty: ``ACCELERATE_COMPRESSION`` (an empty YAML file means
the defaults, as it does for ``accelerate_compress.enable()``), a ``compression:`` section, ``--compression`` or
an option. The Accelerate config (without the section) is checked with Accelerate's own reader before anything
starts, so an unknown key or malformed YAML is reported in one line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
from typing import Any

from accelerate_compress.flag import (
    ADAPTIVE,
    ENV_VAR,
    SECTION,
    _yaml_problem,
    adaptive_options,
    parse_setting,
    resolve,
    to_inline,
)
from lightning_compress.config import _FIELD_TYPES as _CONFIG_FIELD_TYPES
from lightning_compress.config import _OPTIONAL_FIELDS, CompressionConfig, _parse_value

__all__ = ["main", "plan"]

PROG = "accelerate-compress"
# option -> (type, help): every CompressionConfig field (each sets the field of the same name), then GraVAC's.
_FIELD_HELP: dict[str, str] = {
    "compressor": "payload format: none, fp16, bf16, topk, dgc, randk, qsgd, terngrad, natural, sign or powersgd",
    "density": "fraction of entries kept by topk/dgc/randk, in (0, 1]; lower compresses more",
    "bits": "magnitude bits of qsgd (1, 2, 4 or 8); lower compresses more",
    "feedback": "error compensation: none, ef, ef21, diana or doublesqueeze",
    "transport": "auto, allreduce, allgather or two_pass",
    "warmup_steps": "optimizer steps exchanged densely before compression starts (>= 0)",
    "density_warmup_steps": "steps after warmup_steps in which topk/dgc/randk keep 25%, then 4x fewer per stage, "
    "down to density (0: off; 'none': 100 for topk and dgc below 25%)",
    "min_numel": "tensors with fewer elements (and all 1-D tensors) are exchanged densely",
    "block_size": "elements per scale of sign/qsgd/terngrad; larger compresses more; 'none': 1024, 256 with doublesqueeze",
    "seed": "base seed of every random choice (rand-k indices, stochastic rounding)",
    "diana_alpha": "DIANA shift step size in (0, 1], or 'none' for 1 / (omega + 1)",
    "ef21_step": "EF21's estimate step in (0, 2): g_i += ef21_step * C(x_i - g_i); 'none': 1.1 for topk and dgc "
    "at density <= 5% with an optimizer's momentum in the exchange, else 1",
    "dgc_sample_fraction": "fraction of entries dgc (and topk) sample to find the threshold, in (0, 1]",
    "momentum": "where the optimizer's momentum lives: auto, lookahead, heavy_ball, adam_step or optimizer",
    "powersgd_rank": "rank r of powersgd's approximation (>= 1): an n x m gradient sends (n + m) r values",
    "hierarchical": "true: dense inside a node, compressed only across nodes (false: flat)",
    "ranks_per_node": "ranks per node with --hierarchical true; 0 takes LOCAL_WORLD_SIZE",
}
# What a flag's text becomes: the first type the config accepts for the field.
_FIELD_TYPES: dict[str, type] = {name: types[0] for name, types in _CONFIG_FIELD_TYPES.items()}
_OPTIONS: dict[str, tuple[type, str]] = {
    **{name: (_FIELD_TYPES[name], f"{text} (default {getattr(CompressionConfig, name)!s})")
       for name, text in _FIELD_HELP.items()},
    "adaptive": (str, f"adaptive compression factor, one of {ADAPTIVE}"),
    "gravac": (str, "GraVAC parameters 'theta_min=10,window=500,...' (with --adaptive gravac)"),
}  # fmt: skip


class LaunchError(ValueError):
    """A launch setting that cannot work; reported before any worker starts."""


class ConfigFileError(LaunchError):
    """The Accelerate config file cannot be read or Accelerate rejects it; reported in one line."""


def _accelerate_parser() -> argparse.ArgumentParser:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = f"{PROG} launch"
    group = parser.add_argument_group("compression (accelerate-compress)")
    for name, (_kind, text) in _OPTIONS.items():
        # Strings here: values are validated by CompressionConfig, whose message names the option.
        group.add_argument(f"--{name}", default=None, help=text.replace("%", "%%"))  # argparse formats help with %
    group.add_argument("--compression", default=None, help=f"inline 'k=v,...' or a YAML path, as {ENV_VAR}")
    return parser


def _strip_own_options(tokens: list[str]) -> list[str]:
    """The tokens before the script without this launcher's options (``--x v`` and ``--x=v``)."""
    return _drop_option(tokens, tuple(f"--{name}" for name in (*_OPTIONS, "compression")))


def _drop_option(tokens: list[str], names: tuple[str, ...]) -> list[str]:
    """``tokens`` without the options ``names`` (``--x v`` and ``--x=v``)."""
    out, skip = [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in names:
            skip = "=" not in token
            continue
        out.append(token)
    return out


def _replace_option(tokens: list[str], names: tuple[str, ...], value: str) -> list[str]:
    out, skip = [], False
    for token in tokens:
        if skip:
            skip = False
            out.append(value)
            continue
        name = token.split("=", 1)[0]
        if name in names:
            if "=" in token:
                out.append(f"{name}={value}")
            else:
                out.append(token)
                skip = True
            continue
        out.append(token)
    return out


def _read_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the Accelerate config without ``compression:``, the compression section or ``None`` without one)."""
    import yaml

    if not os.path.isfile(path):
        raise LaunchError(f"--config_file {path!r} does not exist")
    if not path.endswith((".yaml", ".yml")):
        raise LaunchError(f"--config_file {path!r}: only YAML config files can carry a `{SECTION}:` section")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ConfigFileError(f"--config_file {path!r} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"--config_file {path!r} must hold a mapping")
    data = dict(data)
    for key in data:
        if key != SECTION and difflib.get_close_matches(str(key), [SECTION], n=1, cutoff=0.8):
            raise ConfigFileError(
                f"--config_file {path!r}: unknown key `{key}:`; did you mean `{SECTION}:`? (the compression section; "
                "Accelerate rejects keys it does not know)"
            )
    if SECTION not in data:
        return data, None
    section = data.pop(SECTION) or {}
    if not isinstance(section, dict):
        raise LaunchError(f"`{SECTION}` in {path!r} must be a mapping of option: value; got {section!r}")
    return data, section


def _check_accelerate_config(stripped: dict[str, Any], path: str) -> None:
    """Let Accelerate's own reader check the config ``accelerate launch`` will get; its message, in one line."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    with tempfile.TemporaryDirectory(prefix="accelerate_compress_") as tmp:
        copy = os.path.join(tmp, "accelerate_config.yaml")
        with open(copy, "w", encoding="utf-8") as handle:
            yaml.safe_dump(stripped, handle)
        try:
            load_config_from_file(copy)
        except (ValueError, TypeError, KeyError) as err:
            message = " ".join(str(err).replace(copy, path).split())
            raise ConfigFileError(f"accelerate rejects --config_file {path!r}: {message}") from None


def plan(argv: list[str], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Work out the ``accelerate launch`` command line and worker environment, validating everything first.

    Returns a dict with ``accelerate_args`` (to ``accelerate launch``), ``env`` (additions for the workers),
    ``config`` (the :class:`~lightning_compress.CompressionConfig`, or ``None`` for no compression) and
    ``stripped_config`` (the Accelerate YAML without its ``compression:`` section, or ``None``).

    Raises:
        LaunchError, ValueError, TypeError: an invalid setting; the message names the option, value and what is allowed.
    """
    environ = dict(os.environ if environ is None else environ)
    args = _accelerate_parser().parse_args(argv)
    n_tail = len(args.training_script_args) + 1
    head = list(argv[: len(argv) - n_tail])
    script, script_args = args.training_script, list(args.training_script_args)
    if args.no_python:
        raise LaunchError(
            "--no_python: accelerate-compress runs the script through Python to enable compression; drop it, or use "
            f"plain `accelerate launch` with {ENV_VAR} and call accelerate_compress.enable() in the script"
        )

    layers: list[dict[str, Any]] = []
    if environ.get(ENV_VAR, "").strip():
        layers.append(parse_setting(environ[ENV_VAR]))
    stripped = None
    config_file = args.config_file
    if config_file is None:
        from accelerate.commands.config import default_config_file

        if os.path.isfile(default_config_file) and default_config_file.endswith((".yaml", ".yml")):
            # `accelerate launch` reads the default file itself; a compression section there must go too.
            config_file = default_config_file
            head = ["--config_file", config_file, *head]
    requested = bool(environ.get(ENV_VAR, "").strip())
    if config_file:
        stripped, file_section = _read_config_file(config_file)
        if stripped:
            _check_accelerate_config(stripped, config_file)
        else:  # the file held only the compression section: accelerate launch goes by its flags
            head = _drop_option(head, ("--config_file", "--config-file"))
            stripped = None
        if file_section is not None:
            layers.append(file_section)
            requested = True
    if args.compression is not None:
        layers.append(parse_setting(args.compression))
        requested = True
    flags = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    if "gravac" in flags:
        gravac = parse_setting(",".join(f"gravac_{item.strip()}" for item in flags.pop("gravac").split(",") if item.strip()))
        flags.update(gravac)
    for name, value in flags.items():
        if name.startswith("gravac_") or name == "adaptive":
            continue
        kind = _OPTIONS[name][0]
        if name in _OPTIONAL_FIELDS and value.strip().lower() == "none":
            flags[name] = None
            continue
        if kind is bool:  # true/false, 1/0, yes/no, on/off, as in "k=v,..."
            flags[name] = _parse_value(name, value.strip())
            continue
        try:
            flags[name] = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise LaunchError(f"--{name} must be {what}; got {value!r}") from None
    layers.append(flags)
    # A setting that is given but empty (an empty YAML file, an empty section) means the defaults, as in enable().
    wanted = requested or bool(flags)
    config = resolve(*layers) if wanted else None
    adaptive = adaptive_options(*layers) if wanted else None
    if adaptive is not None:
        from lightning_compress.adaptive import gravac_config_problem

        problem = gravac_config_problem(config)
        if problem is not None:
            raise LaunchError(f"adaptive=gravac: {problem}")

    head = _strip_own_options(head)
    warnings_out: list[str] = []
    env: dict[str, str] = {}
    cpu_flag = "--cpu" in head
    num_processes = args.num_processes
    use_cpu = cpu_flag or bool(stripped and stripped.get("use_cpu"))
    if num_processes is None and stripped:
        num_processes = stripped.get("num_processes")
    single_node = not (args.num_machines and int(args.num_machines) > 1) and not args.mpirun_hostfile
    if config is not None:
        env_note = _no_process_group_note(head, stripped, use_cpu, num_processes)
        if env_note:
            warnings_out.append(env_note)
    if use_cpu and num_processes and int(num_processes) > 1 and single_node:
        # `accelerate launch --cpu` starts several CPU processes only through mpirun; without a hostfile it starts
        # one. torchrun (the --multi_gpu path) with ACCELERATE_USE_CPU starts them all on gloo instead.
        head = [t for t in head if t != "--cpu"]
        if "--multi_gpu" not in head:
            head.insert(0, "--multi_gpu")
        env["ACCELERATE_USE_CPU"] = "true"
    if config is not None:
        env[ENV_VAR] = to_inline(config, adaptive)
        user_module = bool(args.module)
        head = [t for t in head if t not in ("-m", "--module")]
        tail = ["-m", "accelerate_compress._bootstrap", *(["--module"] if user_module else []), script, *script_args]
    else:
        tail = [script, *script_args]
    return {
        "accelerate_args": head,
        "tail": tail,
        "env": env,
        "config": config,
        "adaptive": adaptive,
        "stripped_config": stripped,
        "warnings": warnings_out,
    }


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _no_process_group_note(head: list[str], stripped: dict[str, Any] | None, use_cpu: bool, num_processes: Any) -> str:
    """Why the processes this launch starts would not form a process group (nothing compressed), or ``""``."""
    kind = str((stripped or {}).get("distributed_type", "")).upper()
    wants_gpus = "--multi_gpu" in head or kind == "MULTI_GPU"
    several = (num_processes is not None and int(num_processes) > 1) or wants_gpus
    if use_cpu or not several or _gpu_count() > 0:
        return ""
    what = f"distributed_type {kind}" if kind else ("--multi_gpu" if "--multi_gpu" in head else "several processes")
    return (
        f"{what} is asked for, but this machine has no GPU: without --cpu Accelerate does not form a process group "
        "on CPU, so each process would train alone and gradients would not be compressed. Add --cpu (or "
        "`use_cpu: true` in the config file) to train on CPU processes over gloo."
    )


def _launch(argv: list[str]) -> int:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pairing advice is repeated by the workers' own validation
            p = plan(argv)
    except ConfigFileError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
        print(f"{PROG}: error: invalid compression setting: {err}", file=sys.stderr)
        return 2
    head = p["accelerate_args"]
    with tempfile.TemporaryDirectory(prefix="accelerate_compress_") as tmp:
        if p["stripped_config"] is not None:
            import yaml

            path = os.path.join(tmp, "accelerate_config.yaml")
            with open(path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(p["stripped_config"], handle)
            head = _replace_option(head, ("--config_file", "--config-file"), path)
        if p["config"] is not None:
            # Requested, not running yet: rank 0 of the workers says what runs, or a warning says nothing does.
            print(f"{PROG}: compression {p['config'].compressor}/{p['config'].feedback} requested "
                  f"({p['env'][ENV_VAR]})", file=sys.stderr, flush=True)  # fmt: skip
        for note in p["warnings"]:
            print(f"{PROG}: warning: {note}", file=sys.stderr, flush=True)
        return _accelerate_launch([*head, *p["tail"]], p["env"])


def _accelerate_launch(argv: list[str], env: dict[str, str]) -> int:
    """``accelerate launch argv`` in this process (one interpreter start less), with ``env`` added for the workers."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    except ChildFailedError:  # torchrun has already printed the workers' failures
        print(f"{PROG}: the training processes failed (see above)", file=sys.stderr)
        return 1
    except Exception as err:  # accelerate launch itself refused (its message, not a traceback)
        print(f"{PROG}: error: accelerate launch: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0


def main(argv: list[str] | None = None) -> int:
    """``accelerate-compress launch [accelerate launch arguments] script.py [script arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} launch [accelerate launch arguments] [--compressor ...] script.py [script arguments]\n"
              f"       {PROG} launch --help")  # fmt: skip
        return 0 if argv else 2
    if argv[0] != "launch":
        print(f"{PROG}: error: unknown command {argv[0]!r}; the only command is 'launch'", file=sys.stderr)
        return 2
    return _launch(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
