"""lightning-compress: compressed, error-compensated gradient exchange for data-parallel PyTorch.

The core (config, compressors, feedback, transports, the DDP hook) imports PyTorch only. The
Lightning pieces (``CompressedDDPStrategy``, ``CompressionMonitor``, ``GraVAC``) are imported
when first used, and the strategy names (``compressed_ddp``, ...) are registered in Lightning's
Trainer and Fabric registries as soon as Lightning itself is imported, before or after this
package, so ``Trainer(strategy="compressed_ddp")`` works without loading Lightning for users of
plain DDP or Accelerate.
"""

import importlib as _importlib
import sys as _sys

from lightning_compress.adaptive import attach_gravac
from lightning_compress.compressors import COMPRESSORS, Compressor
from lightning_compress.config import FEEDBACKS, TRANSPORTS, CompressionConfig
from lightning_compress.gravac import GraVACController
from lightning_compress.hook import compression_hook, get_compression_state, register_compression
from lightning_compress.momentum import attach_optimizer
from lightning_compress.state import CompressionState, CompressionStats

__all__ = [
    "COMPRESSORS",
    "FEEDBACKS",
    "TRANSPORTS",
    "Compressor",
    "CompressionConfig",
    "CompressionState",
    "CompressionStats",
    "GraVACController",
    "attach_gravac",
    "attach_optimizer",
    "compression_hook",
    "get_compression_state",
    "register_compression",
]

__version__ = "0.1.0"

_LIGHTNING_NAMES = {
    "CompressedDDPStrategy": "lightning_compress.strategy",
    "CompressionMonitor": "lightning_compress.callbacks",
    "GraVAC": "lightning_compress.callbacks",
}
__all__ += list(_LIGHTNING_NAMES)


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        return getattr(_importlib.import_module(_LIGHTNING_NAMES[name]), name)
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_NAMES))


from lightning_compress._lightning_names import register_when_lightning_loads  # noqa: E402

register_when_lightning_loads(_sys.modules)
