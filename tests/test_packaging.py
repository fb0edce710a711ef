"""The installed import names: ours only, each file imported once, under one name."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import lightning_compress_kernels

ROOT = Path(__file__).resolve().parents[1]
OURS = {"lightning_compress", "lightning_compress_kernels", "accelerate_compress"}
# Import names other distributions own: "kernels" is Hugging Face's kernel hub package.
TAKEN = {"kernels"}


def test_installed_distribution_claims_only_our_import_names():
    top = set(metadata.distribution("lightning-compress").read_text("top_level.txt").split())
    assert top == OURS, top
    assert not top & TAKEN


def test_built_wheel_holds_only_our_top_level_packages(tmp_path):
    # What a user installs from the package index: the wheel's own top-level folders.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lightning_compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == OURS, top
    assert "lightning_compress_kernels/cpu_ops.c" in names  # the C source travels with the package


def test_the_kernels_folder_is_imported_under_one_name():
    import lightning_compress  # noqa: F401  (imports the compressors, which import the kernels)

    assert lightning_compress_kernels.__file__ == str(ROOT / "kernels" / "__init__.py")
    assert not any(name == "kernels" or name.startswith("kernels.") for name in sys.modules), sorted(
        name for name in sys.modules if name.startswith("kernels")
    )


def _modules_with_examples() -> list[str]:
    found = []
    for info in pkgutil.iter_modules(lightning_compress_kernels.__path__):
        source = Path(lightning_compress_kernels.__path__[0], f"{info.name}.py")
        if source.exists() and ">>>" in source.read_text():
            found.append(f"lightning_compress_kernels.{info.name}")
    return found


@pytest.mark.parametrize("name", _modules_with_examples())
def test_kernel_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_core_imports_without_lightning_and_registers_once_lightning_loads():
    out = _python(
        "import sys, lightning_compress, accelerate_compress\n"
        "print('lightning' in sys.modules, 'lightning_compress.strategy' in sys.modules)\n"
        "import lightning.pytorch as pl\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "from lightning.fabric.strategies import STRATEGY_REGISTRY\n"
        "print('compressed_ddp' in StrategyRegistry, 'compressed_ddp' in STRATEGY_REGISTRY)\n"
        "print(lightning_compress.CompressedDDPStrategy.__module__, lightning_compress.GraVAC.__module__)\n"
    )
    assert out.split() == ["False", "False", "True", "True", "lightning_compress.strategy", "lightning_compress.callbacks"]


def test_strategy_names_register_when_lightning_was_imported_first():
    out = _python(
        "import lightning.pytorch as pl\n"
        "import lightning_compress\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print('compressed_ddp' in StrategyRegistry, 'compressed_ddp_spawn' in StrategyRegistry)\n"
        "t = pl.Trainer(strategy='compressed_ddp', accelerator='cpu', devices=2, logger=False)\n"
        "print(type(t.strategy).__name__)\n"
    )
    assert out.split()[-3:] == ["True", "True", "CompressedDDPStrategy"]
