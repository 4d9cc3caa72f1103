"""MatMulNBits' byte layout of codes and zero points (FORMATS.md §7), and its inverse.

B is uint8 [N, K/block, block·bits/8]: within a block the codes run along K, LSB first, so for
4-bit element 2i sits in the low nibble of byte i and element 2i+1 in the high nibble; 8-bit is one
byte per code. Zero points use the same bit packing along the blocks of a row: uint8
[N, ceil(blocks·bits/8)], a trailing half byte left zero.

>>> import numpy as np
>>> pack_codes(np.array([[1, 2, 3, 4]], dtype=np.uint8), bits=4, block_size=4).tolist()
[[[33, 67]]]
>>> unpack_codes(pack_codes(np.arange(8, dtype=np.uint8).reshape(1, 8), 4, 4), 4).tolist()
[[0, 1, 2, 3, 4, 5, 6, 7]]
"""

from __future__ import annotations

import numpy as np

from bitsmith.errors import FormatError

BYTE_BITS = 8


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., L] values in [0, 2^bits) → bytes [..., ceil(L·bits/8)], LSB first."""
    per_byte = BYTE_BITS // bits
    pad = -values.shape[-1] % per_byte
    v = np.pad(values.astype(np.uint8), [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    v = v.reshape(*v.shape[:-1], -1, per_byte)
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        out |= v[..., j] << (j * bits)
    return out


def _unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of `_pack_rows`: bytes [..., B] → uint8 [..., length]."""
    per_byte = BYTE_BITS // bits
    mask = (1 << bits) - 1
    fields = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    values = np.stack(fields, axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :length].astype(np.uint8)


def blob_size(bits: int, block_size: int) -> int:
    """Bytes of one block of codes."""
    return block_size * bits // BYTE_BITS


def zero_point_bytes(blocks: int, bits: int) -> int:
    """Bytes of one row of packed zero points."""
    return -(-blocks * bits // BYTE_BITS)


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Codes uint8 [N, K] (K a multiple of `block_size`) → B uint8 [N, K/block_size, blob]."""
    n, k = codes.shape
    if k % block_size:
        raise FormatError(f"K={k} is not a multiple of block_size {block_size}")
    return _pack_rows(codes.reshape(n, k // block_size, block_size), bits)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """B uint8 [N, blocks, blob] → codes uint8 [N, blocks·blob·8/bits]."""
    n, _, blob = packed.shape
    return _unpack_rows(packed, bits, blob * BYTE_BITS // bits).reshape(n, -1)


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, blocks] in [0, 2^bits) → uint8 [N, ceil(blocks·bits/8)]."""
    return _pack_rows(zeros, bits)


def unpack_zero_points(packed: np.ndarray, bits: int, blocks: int) -> np.ndarray:
    """Inverse of `pack_zero_points`."""
    return _unpack_rows(packed, bits, blocks)
