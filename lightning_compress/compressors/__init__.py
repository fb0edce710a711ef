"""Gradient compressors and their registry."""

from __future__ import annotations

from lightning_compress.compressors.base import Compressor
from lightning_compress.compressors.identity import BF16Compressor, FP16Compressor, NoneCompressor
from lightning_compress.compressors.powersgd import PowerSGDCompressor
from lightning_compress.compressors.quantize import (
    NaturalCompressor,
    QSGDCompressor,
    SignCompressor,
    TernGradCompressor,
)
from lightning_compress.compressors.sparse import DGCCompressor, RandKCompressor, TopKCompressor

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "NoneCompressor",
    "FP16Compressor",
    "BF16Compressor",
    "TopKCompressor",
    "DGCCompressor",
    "RandKCompressor",
    "QSGDCompressor",
    "TernGradCompressor",
    "NaturalCompressor",
    "SignCompressor",
    "PowerSGDCompressor",
]

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        NoneCompressor,
        FP16Compressor,
        BF16Compressor,
        TopKCompressor,
        DGCCompressor,
        RandKCompressor,
        QSGDCompressor,
        TernGradCompressor,
        NaturalCompressor,
        SignCompressor,
        PowerSGDCompressor,
    )
}
