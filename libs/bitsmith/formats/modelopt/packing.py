"""ModelOpt's int4 byte layout (FORMATS.md §4.1, MO-qu `pack_int4_in_uint8`) and FP8 scale shapes.

Why along the *output* dim: ModelOpt packs two output rows per byte — row 2i in the low nibble, row 2i+1
in the high nibble, each a two's-complement signed int4 — so `weight` is uint8 [N/2, K]. TensorRT-LLM
transposes it to [K, N/2] before its int4 preprocessing, where a byte then holds two neighbouring
output columns, which is what its kernels interleave.

>>> packed = pack_int4_rows(torch.tensor([[-8, 7], [1, -1]], dtype=torch.int8))
>>> [hex(b) for b in packed.flatten().tolist()]
['0x18', '0xf7']
>>> unpack_int4_rows(packed).tolist()
[[-8, 7], [1, -1]]
"""

from __future__ import annotations

import torch

from bitsmith.errors import FormatError
from bitsmith.formats.modelopt.constants import INT4_ZERO
from bitsmith.quantized import QuantizedWeight


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values int8 [N, K] in [-8, 7] → uint8 [N/2, K] (rows 2i low, 2i+1 high nibble)."""
    if q.dim() != 2 or q.shape[0] % 2:
        raise FormatError(f"int4 packing needs a 2-D tensor with an even number of rows, got {tuple(q.shape)}")
    nibbles = q.to(torch.int16) & 0xF
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: uint8 [N/2, K] → int8 [N, K] in [-8, 7]."""
    raw = packed.to(torch.int16)
    low, high = raw & 0xF, (raw >> 4) & 0xF
    rows = torch.stack((low, high), dim=1).reshape(2 * packed.shape[0], packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)


def signed_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The signed int4 values of a symmetric bitsmith weight (zero 8): q = code - 8, so q·scale = dequant."""
    return (qw.codes.to(torch.int16) - INT4_ZERO).to(torch.int8)


def int4_weight(signed: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantizedWeight:
    """A bitsmith `QuantizedWeight` (codes = q + 8, zeros 8, contiguous groups) from file values."""
    from bitsmith.schemes import QuantScheme

    n, k = signed.shape
    groups = scales.shape[1]
    return QuantizedWeight(
        codes=(signed.to(torch.int16) + INT4_ZERO).to(torch.uint8),
        scales=scales.float().contiguous(),
        zeros=torch.full((n, groups), INT4_ZERO, dtype=torch.int32),
        g_idx=(torch.arange(k) // group_size).to(torch.int32),
        scheme=QuantScheme(bits=4, group_size=group_size, sym=True),
    )
