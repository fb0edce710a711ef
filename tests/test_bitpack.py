"""Bit packing (kernels/bitpack.py): roundtrip, packed size, bit layout, bad ``bits``."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress_kernels import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits

LENGTHS = (0, 1, 7, 1023, 4097)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("n", LENGTHS)
def test_roundtrip_and_packed_size(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    unpacked = unpack_bits(packed, bits, n)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_roundtrip_extreme_codes(bits: int) -> None:
    # All-ones codes use every bit of a byte: a shift or mask error shows up here.
    top = (1 << bits) - 1
    for value in (0, top):
        codes = torch.full((4097,), value, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 4097), codes)


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_padding_codes_are_zero(bits: int) -> None:
    # 7 codes of all-ones: the bits of the last byte past element 7 must stay zero.
    per_byte = 8 // bits
    n = per_byte + 1
    codes = torch.full((n,), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == 2
    assert packed[0].item() == 0xFF
    assert packed[1].item() == (1 << bits) - 1  # one code, then zero padding


def test_bit_layout_little_endian_within_byte() -> None:
    # Element j of a byte sits at bit offset j * bits.
    one = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=torch.uint8)
    assert pack_bits(one, 1).tolist() == [0b10001101, 0b00000010]

    two = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    # byte 0: 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001; byte 1: 3
    assert pack_bits(two, 2).tolist() == [0b00111001, 0b00000011]

    four = torch.tensor([0x3, 0xA, 0xF], dtype=torch.uint8)
    assert pack_bits(four, 4).tolist() == [0xA3, 0x0F]

    eight = torch.tensor([0, 17, 255], dtype=torch.uint8)
    assert pack_bits(eight, 8).tolist() == [0, 17, 255]

    # And the inverse reads the same layout.
    assert unpack_bits(torch.tensor([0b10001101], dtype=torch.uint8), 1, 8).tolist() == [1, 0, 1, 1, 0, 0, 0, 1]
    assert unpack_bits(torch.tensor([0xA3, 0x0F], dtype=torch.uint8), 4, 3).tolist() == [0x3, 0xA, 0xF]


def test_pack_accepts_bool_codes() -> None:
    signs = torch.tensor([True, False, True, True, False, False, False, True])
    assert pack_bits(signs, 1).tolist() == [0b10001101]


def test_supported_bits() -> None:
    assert tuple(SUPPORTED_BITS) == (1, 2, 4, 8)


@pytest.mark.parametrize("bits", (0, 3, 5, 16, -1))
def test_invalid_bits_raises_value_error_naming_bits(bits: int) -> None:
    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits") as info:
        pack_bits(codes, bits)
    assert repr(bits) in str(info.value)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(codes, bits, 8)
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(8, bits)
