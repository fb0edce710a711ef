"""Register the strategy names in Lightning's registries when Lightning is imported, not before.

Importing Lightning takes seconds; users of plain DDP or Accelerate never need it. Its
registries (``Trainer(strategy="compressed_ddp")``, ``Fabric(strategy=...)``) must hold our
names by the time a Trainer or Fabric is built, and both come from the ``lightning`` package:
so when ``lightning`` is already imported the names are registered at once, and otherwise a
finder on ``sys.meta_path`` waits for the package to finish importing and registers them then
(importing :mod:`lightning_compress.strategy`, which registers on import), after which it
removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Mapping

PACKAGE = "lightning"
REGISTERING_MODULE = "lightning_compress.strategy"


def _register() -> None:
    importlib.import_module(REGISTERING_MODULE)


class _Loader(importlib.abc.Loader):
    """The package's own loader, then the registration."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = self.loader  # the package keeps its own loader (reloads, resources)
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        _register()


class _WhenImported(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: the lookup below, and every later import, run without this finder
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def register_when_lightning_loads(modules: Mapping[str, ModuleType]) -> None:
    """Register now if Lightning is imported; else once it is (if it is installed at all)."""
    if PACKAGE in modules:
        _register()
    elif not any(isinstance(f, _WhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported())
