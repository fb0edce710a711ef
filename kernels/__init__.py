"""Hot-path tensor ops for gradient compression, on flat tensors.

One op family per module, each with a pure-torch twin (``*_torch``) that defines its meaning,
a C path for CPU tensors (:mod:`lightning_compress_kernels.cpu`) and Triton kernels for CUDA tensors
(``kernels.triton_*``, with their shared tiling in :mod:`lightning_compress_kernels.triton_blocks`);
:mod:`lightning_compress_kernels._dispatch` alone picks the path.

* :mod:`lightning_compress_kernels.bitpack`: bit packing of small codes.
* :mod:`lightning_compress_kernels.sign`: scaled sign with error feedback, decode-accumulate, two-pass server step.
* :mod:`lightning_compress_kernels.qsgd`: QSGD quantize + pack with counter-based stochastic rounding, decode-accumulate.
* :mod:`lightning_compress_kernels.topk`: exact top-k through a sampled threshold with the residual update, scatter-add.
* :mod:`lightning_compress_kernels.rng`: the counter-based uniform generator shared by all paths.

Importable without a GPU and without any training framework.
"""

from .bitpack import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits

__all__ = ["SUPPORTED_BITS", "pack_bits", "packed_nbytes", "unpack_bits"]
