"""compressed-tensors' int32 packing along the last dimension (FORMATS.md §3.3).

Why GPTQ's packer serves: since compressed-tensors 0.18.0 every row is one continuous little-endian
bit stream cut into int32 words, with the row zero-padded to whole words — the stream
`bitsmith.formats.gptq.packing` writes along dim 0. Here rows are packed along their last dim, lengths
need not fill whole chunks (the tail is zero-padded, then the words it does not reach are dropped,
as `pack_to_int32` does), and the layout before 0.18.0 (32 // b whole values per word) can be read.
Values are unsigned (signed value + 2^(b-1)), as stored.

>>> import torch
>>> pack_rows(torch.tensor([[1, 2, 3]]), 4).tolist()
[[801]]
>>> unpack_rows(pack_rows(torch.arange(40).reshape(1, 40) % 8, 3), 3, 40).flatten().tolist()[8:13]
[0, 1, 2, 3, 4]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitsmith.formats.compressed_tensors.constants import WORD_BITS
from bitsmith.formats.gptq.packing import chunk_shape, pack_dim0, unpack_dim0

_WORD_MASK = (1 << WORD_BITS) - 1


def packed_width(length: int, bits: int, *, legacy: bool = False) -> int:
    """int32 words holding `length` values: ceil(length·b/32), or before 0.18.0 ceil(length / (32 // b))."""
    if legacy:
        return -(-length // (WORD_BITS // bits))
    return -(-length * bits // WORD_BITS)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, L] in [0, 2^bits) → int32 [R, ceil(L·bits/32)], each row one bit stream."""
    length = values.shape[1]
    per_chunk, _ = chunk_shape(bits)
    padded = F.pad(values.to(torch.int64), (0, -length % per_chunk))
    words = pack_dim0(padded.t(), bits).t()[:, : packed_width(length, bits)]
    return torch.empty(words.shape, dtype=torch.int32).copy_(words)  # row-major strides even for 1-word rows


def unpack_rows(words: torch.Tensor, bits: int, length: int, *, legacy: bool = False) -> torch.Tensor:
    """Inverse of `pack_rows` (or of the pre-0.18.0 packer if `legacy`): int64 [R, length].

    The caller has checked that `words` has `packed_width(length, bits, legacy=legacy)` columns.
    """
    if legacy and WORD_BITS % bits:
        return _unpack_whole_values(words, bits, length)
    _, words_per_chunk = chunk_shape(bits)
    padded = F.pad(words, (0, -words.shape[1] % words_per_chunk))
    return unpack_dim0(padded.t().contiguous(), bits).t()[:, :length].contiguous()


def _unpack_whole_values(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Before 0.18.0: value `w·pf + j` of a row sits whole in field j of word w, pf = 32 // bits."""
    per_word = WORD_BITS // bits
    u = words.to(torch.int64) & _WORD_MASK
    fields = [(u >> (j * bits)) & ((1 << bits) - 1) for j in range(per_word)]
    return torch.stack(fields, dim=2).reshape(words.shape[0], -1)[:, :length].contiguous()
