"""lightning-compress: compressed, error-compensated gradient exchange for data-parallel PyTorch."""

from importlib.util import find_spec as _find_spec

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

# The core runs without Lightning; with it, the import registers the strategy names
# (compressed_ddp, compressed_ddp_spawn, ...) in Lightning's Trainer and Fabric registries.
if _find_spec("lightning") is not None:
    from lightning_compress.callbacks import CompressionMonitor, GraVAC
    from lightning_compress.strategy import CompressedDDPStrategy

    __all__ += ["CompressedDDPStrategy", "CompressionMonitor", "GraVAC"]
