"""Hot-path tensor ops for gradient compression, on flat tensors.

Importable without a GPU and without any training framework.
"""

from kernels.bitpack import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits

__all__ = ["SUPPORTED_BITS", "pack_bits", "packed_nbytes", "unpack_bits"]
