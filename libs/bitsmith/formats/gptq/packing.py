"""GPTQ's int32 bit packing along the first dimension (FORMATS.md §1.4-1.5).

Why one routine serves every width: for 2/4/8 bits each word holds 32/b whole values, LSB first,
and for 3 bits 32 values fill 3 words with values 10 and 21 straddling word boundaries. Both are the
same thing — the values of one column laid end to end as a little-endian bit stream, cut into 32-bit
words — so packing and unpacking are written once for that stream. qweight packs codes along K
(input), qzeros packs zeros along N (output): callers transpose so the packed dim comes first.
Widths that divide 8 (2, 4, 8 bits) make that stream whole bytes, so they are packed a byte at a time
in uint8 and the bytes read as little-endian words: the same words, from a quarter of the memory
traffic of 64-bit arithmetic (packing an 8B model's linears took seconds per block before).

>>> import torch
>>> hex(pack_dim0(torch.full((8, 1), 7), 4).item() & 0xFFFFFFFF)
'0x77777777'
>>> unpack_dim0(pack_dim0(torch.arange(32).reshape(32, 1) % 8, 3), 3).flatten().tolist()[:12]
[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
"""

from __future__ import annotations

import sys
from math import gcd

import torch

from bitsmith.errors import FormatError
from bitsmith.formats.gptq.constants import WORD_BITS

_WORD_MASK = (1 << WORD_BITS) - 1


def chunk_shape(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest whole chunk: (8, 1) for 4-bit, (32, 3) for 3-bit."""
    g = gcd(WORD_BITS, bits)
    return WORD_BITS // g, bits // g


def packed_rows(length: int, bits: int, *, what: str) -> int:
    """Words needed for `length` values; `FormatError` if they do not fill whole chunks."""
    values, words = chunk_shape(bits)
    if length % values:
        raise FormatError(
            f"{what}: {length} values of {bits} bits do not fill whole int32 words "
            f"(need a multiple of {values})"
        )
    return length // values * words


def pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2^bits) [L, M] into int32 words [L·bits/32, M] along dim 0."""
    packed_rows(values.shape[0], bits, what="pack")
    if 8 % bits == 0 and sys.byteorder == "little":
        return _pack_bytes(values, bits)
    return _pack_stream(values, bits)


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_dim0` for any width, on the bit stream in 64-bit arithmetic (3 bits straddle words)."""
    length, cols = values.shape
    n_values, n_words = chunk_shape(bits)
    rows = packed_rows(length, bits, what="pack")
    x = values.to(torch.int64).reshape(length // n_values, n_values, cols)
    words = torch.zeros(length // n_values, n_words, cols, dtype=torch.int64)
    for i in range(n_values):
        word, shift = divmod(i * bits, WORD_BITS)
        words[:, word] |= (x[:, i] << shift) & _WORD_MASK
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= x[:, i] >> (WORD_BITS - shift)
    words = torch.where(words >= 1 << (WORD_BITS - 1), words - (1 << WORD_BITS), words)
    return words.reshape(rows, cols).to(torch.int32)


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_dim0` for widths that divide 8: each column's values, `8 // bits` to a byte, LSB first,
    then every 4 bytes of a column read as one little-endian int32."""
    per_byte = 8 // bits
    by_column = values.t().to(torch.uint8)  # [M, L]: the packed dim last (contiguous for a transposed view)
    x = by_column.reshape(by_column.shape[0], -1, per_byte)
    packed = x[..., 0].clone()
    for i in range(1, per_byte):
        packed |= x[..., i] << (i * bits)
    return packed.contiguous().view(torch.int32).t().contiguous()


def unpack_dim0(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_dim0`: int32 [R, M] → int64 values [R·32/bits, M] in [0, 2^bits)."""
    rows, cols = words.shape
    n_values, n_words = chunk_shape(bits)
    if rows % n_words:
        raise FormatError(f"unpack: {rows} words of {bits}-bit values are not whole chunks of {n_words}")
    u = (words.to(torch.int64) & _WORD_MASK).reshape(rows // n_words, n_words, cols)
    mask = (1 << bits) - 1
    out = []
    for i in range(n_values):
        word, shift = divmod(i * bits, WORD_BITS)
        value = u[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (u[:, word + 1] << (WORD_BITS - shift))
        out.append(value & mask)
    return torch.stack(out, dim=1).reshape(rows // n_words * n_values, cols)
