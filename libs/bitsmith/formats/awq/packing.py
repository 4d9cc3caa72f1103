"""AWQ GEMM's int32 packing along the output dim, in its interleaved order (FORMATS.md §2.2).

Why on top of GPTQ's packer: an AWQ word is 8 four-bit fields, LSB first, exactly like a GPTQ word;
only which value goes in which field differs (field i of the word for channels 8c..8c+7 holds channel
8c + ORDER[i]). So the output rows are permuted by `interleave` and packed by `pack_dim0`; unpacking
is `unpack_dim0` followed by the inverse permutation. qweight packs codes [N, K] into [K, N/8], qzeros
packs zeros [N, G] into [G, N/8] — the same function.

>>> hex(pack_output_dim(torch.arange(8).reshape(8, 1)).item())
'0x75316420'
>>> unpack_output_dim(pack_output_dim(torch.arange(16).reshape(16, 1) % 16)).flatten().tolist()[:10]
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import torch

from bitsmith.errors import FormatError
from bitsmith.formats.awq.constants import BITS, ORDER, PACK_FACTOR, QWEIGHT, QZEROS, REVERSE, SCALES
from bitsmith.formats.gptq.packing import pack_dim0, unpack_dim0
from bitsmith.quantized import QuantizedWeight


def _permutation(n: int, order: tuple[int, ...], what: str) -> torch.Tensor:
    if n % PACK_FACTOR:
        raise FormatError(f"{what}: {n} output channels are not a multiple of {PACK_FACTOR}")
    base = torch.arange(0, n, PACK_FACTOR).repeat_interleave(PACK_FACTOR)
    return base + torch.tensor(order).repeat(n // PACK_FACTOR)


def interleave(n: int) -> torch.Tensor:
    """Row order p with p[8c + i] = 8c + ORDER[i]: packing rows p of the values LSB first gives AWQ words."""
    return _permutation(n, ORDER, "pack")


def pack_output_dim(values: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 16) [N, R] → int32 words [R, N/8] in AWQ's interleaved order."""
    return pack_dim0(values[interleave(values.shape[0])], BITS).t().contiguous()


def unpack_output_dim(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_output_dim`: int32 [R, W] → int64 values [8·W, R]."""
    fields = unpack_dim0(words.t(), BITS)  # row 8c + i is field i of word c
    return fields[_permutation(fields.shape[0], REVERSE, "unpack")]


def pack_layer(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight [K, N/8] / qzeros [G, N/8] / scales fp16 [G, N] of one validated linear."""
    return {
        QWEIGHT: pack_output_dim(qw.codes),
        QZEROS: pack_output_dim(qw.zeros),
        SCALES: qw.scales.t().to(torch.float16).contiguous(),
    }


def packed_nbytes(qw: QuantizedWeight) -> int:
    """Bytes `pack_layer` will produce (for sharding before anything is packed)."""
    n, k = qw.shape
    groups = qw.scales.shape[1]
    return 4 * (k * n // PACK_FACTOR) + 4 * (groups * n // PACK_FACTOR) + 2 * groups * n
