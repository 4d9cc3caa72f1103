"""ggml's block types (FORMATS.md §5.7): llama.cpp's quantizers, their bytes, and what the bytes mean.

Every quantized ggml type stores a row as blocks of `block_size` weights; inside a block each
sub-block of `sub_block` weights lies on an affine grid value = a·(code - offset) - b with integer
codes in [0, maxq] (`grid`): the legacy types have one grid per 32-weight block, the K-quants 8 or 16
sub-block grids whose scales (and mins) are themselves quantized against the super-block's fp16 `d`
(and `dmin`). `fit` chooses all of it the way llama.cpp does, vectorized over every block of every
row at once:

* without importance, llama-quantize's path without ``--imatrix``: the ``quantize_row_*_ref``
  functions (make_qkx2_quants for Q2_K/Q4_K/Q5_K, make_q3_quants for Q3_K, make_qx_quants for Q6_K,
  the closed formulas of the legacy types);
* with importance (one weight per input column, llama.cpp's imatrix; bitsmith passes the Hessian
  diagonal, 2·mean x², the same up to a factor that none of the searches sees), the
  ``quantize_row_*_impl`` functions: make_qkx3_quants / make_qx_quants on weights
  importance·sqrt(σ² + x²), the sub-block scales searched by make_qp_quants / make_qx_quants.

The searches follow the C float32 arithmetic step by step (`bitsmith.algos.kquant_search`); fp16
rounding of d/dmin happens where llama.cpp does it, and the K-quants' codes are re-rounded on the
fp16 grid as the C code does. `pack`/`unpack` convert between the fields (`Blocks`) and the bytes.

>>> w = torch.linspace(-1, 1, 256).reshape(1, 256)
>>> q = quantize(w, GGMLType.Q4_K)
>>> q.data.shape, float((dequantize(q.data, GGMLType.Q4_K, 256) - w).abs().max()) < 0.05
(torch.Size([1, 144]), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from bitsmith.algos.kquant_search import (
    abs_max_signed,
    affine_search,
    div,
    q3_search,
    round_half_away,
    scale_search,
    seq_sum,
    sqrt,
    symmetric_search,
)
from bitsmith.errors import ConfigError, FormatError, SolverError
from bitsmith.quantized import GGMLWeight
from bitsmith.schemes import GGMLScheme, GGMLType

QK_K = 256
"""Weights per K-quant super-block."""

FIT_ELEMENTS = 1 << 22
"""Weights fit at once by `quantize`: bounds the search's temporaries (a few dozen bytes a weight)."""


class Family(Enum):
    """How a type turns its stored fields into sub-block grids (see `grid`)."""

    LEGACY_SYMMETRIC = "a = d, b = 0"
    LEGACY_AFFINE = "a = d, b = -m"
    K_AFFINE = "a = d·scale, b = dmin·min"
    K_SYMMETRIC = "a = d·(scale - scale_bias), b = 0"


@dataclass(frozen=True, slots=True)
class Layout:
    """What a quantized type's blocks hold: sub-block size, code range and how codes are centred."""

    family: Family
    sub_block: int
    maxq: int
    offset: int
    """Signed types store code - offset; their grid is a·(code - offset)."""
    scale_max: int = 0
    """Largest sub-block scale code of a K-quant (its min code has the same range where it has one)."""
    scale_bias: int = 0
    """Q3_K stores its signed 6-bit scales biased by 32."""

    def sub_blocks(self, block_size: int) -> int:
        return block_size // self.sub_block


LAYOUTS: dict[GGMLType, Layout] = {
    GGMLType.Q8_0: Layout(family=Family.LEGACY_SYMMETRIC, sub_block=32, maxq=255, offset=128),
    GGMLType.Q4_0: Layout(family=Family.LEGACY_SYMMETRIC, sub_block=32, maxq=15, offset=8),
    GGMLType.Q5_0: Layout(family=Family.LEGACY_SYMMETRIC, sub_block=32, maxq=31, offset=16),
    GGMLType.Q4_1: Layout(family=Family.LEGACY_AFFINE, sub_block=32, maxq=15, offset=0),
    GGMLType.Q5_1: Layout(family=Family.LEGACY_AFFINE, sub_block=32, maxq=31, offset=0),
    GGMLType.Q2_K: Layout(family=Family.K_AFFINE, sub_block=16, maxq=3, offset=0, scale_max=15),
    GGMLType.Q4_K: Layout(family=Family.K_AFFINE, sub_block=32, maxq=15, offset=0, scale_max=63),
    GGMLType.Q5_K: Layout(family=Family.K_AFFINE, sub_block=32, maxq=31, offset=0, scale_max=63),
    GGMLType.Q3_K: Layout(family=Family.K_SYMMETRIC, sub_block=16, maxq=7, offset=4, scale_max=63, scale_bias=32),
    GGMLType.Q6_K: Layout(family=Family.K_SYMMETRIC, sub_block=16, maxq=63, offset=32, scale_max=127),
}
"""Every quantized type bitsmith writes (FORMATS.md §5.7)."""


def layout(type: GGMLType) -> Layout:
    """The layout of a quantized type; `ConfigError` for float types."""
    try:
        return LAYOUTS[GGMLType(type)]
    except KeyError:
        raise ConfigError(f"{type} is not a quantized ggml type; known: {[t.value for t in LAYOUTS]}") from None


@dataclass(frozen=True, slots=True)
class Blocks:
    """The fields of a type's blocks, unpacked: R rows of nb blocks, S sub-blocks a block.

    codes:  uint8 [R, nb·block_size], every weight's code in [0, maxq].
    d:      float16 [R, nb], the block scale (kept as fp16 so bytes round-trip bit for bit).
    dmin:   float16 [R, nb], the K-quants' min scale or Q4_1/Q5_1's min; zero where a type has none.
    scales: int16 [R, nb, S], the K-quants' sub-block scale codes as stored (Q6_K's are signed);
            S = 0 for the legacy types.
    mins:   int16 [R, nb, S], the sub-block min codes (Q2_K, Q4_K, Q5_K); zero for the others.
    """

    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def with_codes(self, codes: torch.Tensor) -> Blocks:
        """The same grids holding other codes (what GPTQ rounded to)."""
        return Blocks(codes=codes.to(torch.uint8), d=self.d, dmin=self.dmin, scales=self.scales, mins=self.mins)


def cat_blocks(parts: list[Blocks], dim: int) -> Blocks:
    """Blocks joined along rows (`dim` 0) or along the row, block after block (`dim` 1)."""
    return Blocks(
        codes=torch.cat([p.codes for p in parts], dim),
        d=torch.cat([p.d for p in parts], dim),
        dmin=torch.cat([p.dmin for p in parts], dim),
        scales=torch.cat([p.scales for p in parts], dim),
        mins=torch.cat([p.mins for p in parts], dim),
    )


def grid(blocks: Blocks, type: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) float32 [R, nb·S]: sub-block s of a row holds the values a[s]·(code - offset) - b[s].

    The products are formed as gguf-py's and ggml's decoders form them, so `dequantize` is exact.
    """
    lay = layout(type)
    d, dmin = blocks.d.float(), blocks.dmin.float()
    if lay.family is Family.LEGACY_SYMMETRIC:
        return d, torch.zeros_like(d)
    if lay.family is Family.LEGACY_AFFINE:
        return d, -dmin
    a = d[..., None] * (blocks.scales - lay.scale_bias).float()
    if lay.family is Family.K_AFFINE:
        return a.flatten(1), (dmin[..., None] * blocks.mins.float()).flatten(1)
    return a.flatten(1), torch.zeros_like(a).flatten(1)


def values(blocks: Blocks, type: GGMLType) -> torch.Tensor:
    """The float32 weights [R, K] the blocks stand for."""
    lay = layout(type)
    a, b = grid(blocks, type)
    a = a.repeat_interleave(lay.sub_block, dim=1)
    b = b.repeat_interleave(lay.sub_block, dim=1)
    return a * (blocks.codes.float() - lay.offset) - b


# ---------------------------------------------------------------------------------------------- fitting


def fit(
    weight: torch.Tensor,
    type: GGMLType,
    importance: torch.Tensor | None = None,
    row_sigma2: torch.Tensor | None = None,
) -> Blocks:
    """llama.cpp's blocks for `weight` [R, K] (float32, K a multiple of the block size).

    `importance` [K] selects the imatrix path. The legacy types' imatrix weights use the variance of
    the whole row, `row_sigma2` [R] (Σx²/K of `weight` when not given): GPTQ fits a block at a time
    and passes the variance of the row it started from.
    """
    lay = layout(type)
    r, k = weight.shape
    x = weight.float().reshape(r, k // type.block_size, type.block_size)
    qw = None if importance is None else importance.float().reshape(k // type.block_size, type.block_size)
    if lay.family in (Family.LEGACY_SYMMETRIC, Family.LEGACY_AFFINE):
        if qw is not None and type is not GGMLType.Q8_0:
            sigma2 = div(seq_sum(weight.float() * weight.float()), k) if row_sigma2 is None else row_sigma2.float()
            return _fit_legacy_weighted(x, lay, qw[None] * sqrt(sigma2[:, None, None] + x * x))
        return _fit_legacy(x, type, lay)
    if lay.family is Family.K_AFFINE:
        return _fit_k_affine(x, type, lay, qw)
    if type is GGMLType.Q3_K:
        return _fit_q3_k(x, lay, qw)
    return _fit_q6_k(x, lay, qw)


def _zeros_like_d(d: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(d, dtype=torch.float16)


def _no_sub_scales(d: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*d.shape, 0, dtype=torch.int16, device=d.device)


def _fit_legacy(x: torch.Tensor, type: GGMLType, lay: Layout) -> Blocks:
    """`quantize_row_q{8_0,4_0,5_0,4_1,5_1}_ref`: closed-form scales, codes from the unrounded one."""
    r = x.shape[0]
    if type is GGMLType.Q8_0:
        d = div(x.abs().amax(-1), 127)
        inv = torch.where(d != 0, div(1, d), torch.zeros_like(d))
        codes = round_half_away(x * inv[..., None]) + lay.offset
        dmin = _zeros_like_d(d)
    elif lay.family is Family.LEGACY_SYMMETRIC:
        d = div(abs_max_signed(x), -lay.offset)
        inv = torch.where(d != 0, div(1, d), torch.zeros_like(d))
        codes = (x * inv[..., None] + (lay.offset + 0.5)).trunc().clamp(0, lay.maxq)
        dmin = _zeros_like_d(d)
    else:
        low = x.amin(-1)
        d = div(x.amax(-1) - low, lay.maxq)
        inv = torch.where(d != 0, div(1, d), torch.zeros_like(d))
        codes = ((x - low[..., None]) * inv[..., None] + 0.5).trunc().clamp(0, lay.maxq)
        dmin = low.half()
    return Blocks(codes=codes.reshape(r, -1).to(torch.uint8), d=d.half(), dmin=dmin, scales=_no_sub_scales(d),
                  mins=_no_sub_scales(d))


def _fit_legacy_weighted(x: torch.Tensor, lay: Layout, weights: torch.Tensor) -> Blocks:
    """`quantize_row_q{4_0,5_0,4_1,5_1}_impl`: the weighted searches' codes are kept as they are."""
    r, nb, n = x.shape
    flat, w = x.reshape(-1, n), weights.reshape(-1, n)
    if lay.family is Family.LEGACY_SYMMETRIC:
        codes, scale = symmetric_search(flat, lay.offset, w)
        dmin = torch.zeros(r, nb, dtype=torch.float16, device=x.device)
    else:
        codes, scale, the_min = affine_search(flat, w, lay.maxq, -0.9, 0.05, 36, use_mad=False)
        dmin = (-the_min).half().reshape(r, nb)
    d = scale.half().reshape(r, nb)
    return Blocks(codes=codes.reshape(r, -1).to(torch.uint8), d=d, dmin=dmin, scales=_no_sub_scales(d),
                  mins=_no_sub_scales(d))


def _super_block_weights(x: torch.Tensor, qw: torch.Tensor, sigma_factor: int) -> torch.Tensor:
    """importance·sqrt(σ² + x²), σ² = factor·Σx²/256 over each super-block x [R, nb, 256]."""
    sigma2 = div(sigma_factor * seq_sum(x * x), QK_K)
    return qw[None] * sqrt(sigma2[..., None] + x * x)


def _requantize(
    codes: torch.Tensor, sub_x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lay: Layout
) -> torch.Tensor:
    """Codes re-rounded on the final (fp16-derived) sub-block grids, as the K-quant quantizers end:
    code = round((x + b)/a) + offset, clamped; sub-blocks whose a is 0 keep their search codes."""
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    new = ((sub_x + b) / a).round().clamp(-lay.offset, lay.maxq - lay.offset) + lay.offset
    return torch.where(a != 0, new, codes)


def _fit_k_affine(x: torch.Tensor, type: GGMLType, lay: Layout, qw: torch.Tensor | None) -> Blocks:
    """Q2_K, Q4_K, Q5_K: sub-blocks a·code - b, 4- or 6-bit scale and min codes against d and dmin."""
    r, nb, _ = x.shape
    s = lay.sub_blocks(QK_K)
    flat = x.reshape(-1, lay.sub_block)
    if qw is None:
        # Q2_K weighs by |x|, Q4_K/Q5_K by |x| plus the sub-block's RMS.
        rms = torch.zeros_like(flat[:, :1]) if type is GGMLType.Q2_K else sqrt(div(seq_sum(flat * flat), 32))[:, None]
        weights = rms + flat.abs()
        rmin, rdelta, nstep = {GGMLType.Q2_K: (-0.5, 0.1, 15), GGMLType.Q4_K: (-1.0, 0.1, 20),
                               GGMLType.Q5_K: (-0.5, 0.1, 15)}[type]
        codes, scale, the_min = affine_search(flat, weights, lay.maxq, rmin, rdelta, nstep,
                                              use_mad=type is GGMLType.Q2_K)
        scale, the_min = scale.reshape(-1, s), the_min.reshape(-1, s)
        ls, d = _max_anchored_codes(scale, lay.scale_max)
        lm, dmin = _max_anchored_codes(the_min, lay.scale_max)
    else:
        weights = _super_block_weights(x, qw, 1 if type is GGMLType.Q2_K else 2).reshape(-1, lay.sub_block)
        codes, scale, the_min = affine_search(flat, weights, lay.maxq, -0.9, 0.05, 36, use_mad=False)
        sw = seq_sum(weights).reshape(-1, s)
        ls, d_block = scale_search(scale.reshape(-1, s), lay.scale_max, sw)
        lm, m_block = scale_search(the_min.reshape(-1, s), lay.scale_max, sw)
        d, dmin = d_block.half(), m_block.half()
    a = d.float()[:, None] * ls
    b = dmin.float()[:, None] * lm
    codes = _requantize(codes, flat, a, b, lay)
    return Blocks(codes=codes.reshape(r, -1).to(torch.uint8), d=d.reshape(r, nb), dmin=dmin.reshape(r, nb),
                  scales=ls.reshape(r, nb, s).to(torch.int16), mins=lm.reshape(r, nb, s).to(torch.int16))


def _max_anchored_codes(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes round(top·v/max) in [0, top] and fp16 max/top: the reference K-quants' sub-block scale
    (or min) quantization against the largest one (codes 0 when nothing is positive)."""
    vmax = values.amax(-1)
    vmax = torch.where(vmax > 0, vmax, torch.zeros_like(vmax))
    inv = torch.where(vmax > 0, div(top, vmax), torch.zeros_like(vmax))
    return (inv[:, None] * values).round().clamp(0, top), div(vmax, top).half()


def _signed_scale_codes(scale: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes round(-top·s/m), the float32 inverse -top/m, m): the reference Q3_K/Q6_K quantization of
    signed sub-block scales against the one of largest magnitude m (inverse inf when m is 0)."""
    anchor = abs_max_signed(scale)
    iscale = div(-top, anchor)
    return (iscale[:, None] * scale).round(), iscale, anchor


def _fit_q3_k(x: torch.Tensor, lay: Layout, qw: torch.Tensor | None) -> Blocks:
    """Q3_K: 16 sub-blocks a·(code - 4), signed 6-bit scales (stored + 32) against d."""
    r, nb, _ = x.shape
    flat = x.reshape(-1, lay.sub_block)
    if qw is None:
        codes, scale = q3_search(flat, 4)
        levels, iscale, anchor = _signed_scale_codes(scale.reshape(-1, 16), 32)
        nonzero = (anchor != 0)[:, None]
        stored = torch.where(nonzero, levels.clamp(-32, 31) + 32, torch.zeros_like(levels))
        d = torch.where(anchor != 0, div(1, iscale), torch.zeros_like(iscale)).half()
    else:
        weights = _super_block_weights(x, qw, 2).reshape(-1, lay.sub_block)
        codes, scale = symmetric_search(flat, 4, weights)
        stored, d_block = symmetric_search(scale.reshape(-1, 16), 32, seq_sum(weights).reshape(-1, 16))
        d = d_block.half()
    a = d.float()[:, None] * (stored - lay.scale_bias)
    codes = _requantize(codes, flat, a, torch.zeros_like(a), lay)
    return Blocks(codes=codes.reshape(r, -1).to(torch.uint8), d=d.reshape(r, nb),
                  dmin=torch.zeros(r, nb, dtype=torch.float16, device=x.device),
                  scales=stored.reshape(r, nb, 16).to(torch.int16), mins=torch.zeros(r, nb, 16, dtype=torch.int16,
                                                                                    device=x.device))


def _fit_q6_k(x: torch.Tensor, lay: Layout, qw: torch.Tensor | None) -> Blocks:
    """Q6_K: 16 sub-blocks a·(code - 32), int8 scales against d; all-zero super-blocks are all zero."""
    r, nb, _ = x.shape
    flat = x.reshape(-1, lay.sub_block)
    weights = None if qw is None else qw.reshape(-1, lay.sub_block).repeat(r, 1)
    codes, scale = symmetric_search(flat, 32, weights)
    levels, iscale, anchor = _signed_scale_codes(scale.reshape(-1, 16), 128)
    live = anchor.abs() >= 1e-15
    stored = torch.where(live[:, None], levels.clamp(max=127), torch.zeros_like(levels))
    d = torch.where(live, div(1, iscale), torch.zeros_like(iscale)).half()
    a = d.float()[:, None] * stored
    codes = torch.where(live.repeat_interleave(16)[:, None], codes, torch.zeros_like(codes))
    codes = _requantize(codes, flat, a, torch.zeros_like(a), lay)
    return Blocks(codes=codes.reshape(r, -1).to(torch.uint8), d=d.reshape(r, nb),
                  dmin=torch.zeros(r, nb, dtype=torch.float16, device=x.device),
                  scales=stored.reshape(r, nb, 16).to(torch.int16), mins=torch.zeros(r, nb, 16, dtype=torch.int16,
                                                                                    device=x.device))


# ------------------------------------------------------------------------------------------- bytes


def _pack_planes(planes: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Bytes holding plane i of `planes` (along `dim`, negative) in bits [width·i, width·(i+1))."""
    count = planes.shape[dim]
    shifts = (torch.arange(count, device=planes.device, dtype=torch.int32) * width).reshape(count, *[1] * (-dim - 1))
    mask = (1 << width) - 1
    return ((planes.to(torch.int32) & mask) << shifts).sum(dim).to(torch.uint8)


def _unpack_planes(packed: torch.Tensor, width: int, count: int, dim: int) -> torch.Tensor:
    """int32 planes of `packed` along a new `dim` (negative): the inverse of `_pack_planes`."""
    shifts = (torch.arange(count, device=packed.device, dtype=torch.int32) * width).reshape(count, *[1] * (-dim - 1))
    return (packed.to(torch.int32).unsqueeze(dim) >> shifts) & ((1 << width) - 1)


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    """float16 [R, nb] as its little-endian bytes [R, nb, 2]."""
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)


def _bytes_half(b: torch.Tensor) -> torch.Tensor:
    """uint8 [R, nb, 2] as float16 [R, nb] (bit for bit)."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 scale bytes for 6-bit sc, m [R, nb, 8] (FORMATS.md §5.7, get_scale_min_k4)."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    return torch.cat(
        (
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4),
        ),
        -1,
    ).to(torch.uint8)


def _k4_unscales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    low_sc, low_m, high = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat((low_sc & 63, (high & 15) | ((low_sc >> 6) << 4)), -1)
    mn = torch.cat((low_m & 63, (high >> 4) | ((low_m >> 6) << 4)), -1)
    return sc.to(torch.int16), mn.to(torch.int16)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes for 6-bit s [R, nb, 16]: low nibbles of 0..7 | 8..15, then 2-bit tops."""
    r, nb, _ = s.shape
    low = _pack_planes(s.reshape(r, nb, 2, 8) & 15, 4, -2)
    high = _pack_planes(s.reshape(r, nb, 4, 4) >> 4, 2, -2)
    return torch.cat((low, high), -1)


def _q3_unscales(b: torch.Tensor) -> torch.Tensor:
    r, nb, _ = b.shape
    low = _unpack_planes(b[..., :8], 4, 2, -2).reshape(r, nb, 16)
    high = _unpack_planes(b[..., 8:], 2, 4, -2).reshape(r, nb, 16)
    return (low | (high << 4)).to(torch.int16)


def pack(blocks: Blocks, type: GGMLType) -> torch.Tensor:
    """The bytes uint8 [R, row_bytes] of `blocks` in `type`'s block layout (FORMATS.md §5.7)."""
    lay = layout(type)
    q = blocks.codes.to(torch.int32)
    r, nb = blocks.d.shape
    q = q.reshape(r, nb, type.block_size)
    d, dmin = _half_bytes(blocks.d), _half_bytes(blocks.dmin)
    if type is GGMLType.Q8_0:
        fields = [d, (q - lay.offset).to(torch.int8).view(torch.uint8)]
    elif lay.family in (Family.LEGACY_SYMMETRIC, Family.LEGACY_AFFINE):
        qs = _pack_planes(q.reshape(r, nb, 2, 16) & 15, 4, -2)
        fifth = [_pack_planes((q >> 4).reshape(r, nb, 4, 8), 1, -1)] if lay.maxq == 31 else []
        fields = [d, *([dmin] if lay.family is Family.LEGACY_AFFINE else []), *fifth, qs]
    elif type is GGMLType.Q2_K:
        scales = _pack_planes(torch.stack((blocks.scales, blocks.mins), -2), 4, -2)
        fields = [scales, _pack_planes(q.reshape(r, nb, 2, 4, 32), 2, -2).reshape(r, nb, 64), d, dmin]
    elif type is GGMLType.Q3_K:
        hmask = _pack_planes((q >> 2).reshape(r, nb, 8, 32), 1, -2)
        qs = _pack_planes((q & 3).reshape(r, nb, 2, 4, 32), 2, -2).reshape(r, nb, 64)
        fields = [hmask, qs, _q3_scales(blocks.scales.to(torch.int32)), d]
    elif type is GGMLType.Q6_K:
        ql = _pack_planes((q & 15).reshape(r, nb, 2, 2, 2, 32), 4, -3).reshape(r, nb, 128)
        qh = _pack_planes((q >> 4).reshape(r, nb, 2, 4, 32), 2, -2).reshape(r, nb, 64)
        fields = [ql, qh, blocks.scales.to(torch.int8).view(torch.uint8), d]
    else:
        qs = _pack_planes((q & 15).reshape(r, nb, 4, 2, 32), 4, -2).reshape(r, nb, 128)
        fifth = [_pack_planes((q >> 4).reshape(r, nb, 8, 32), 1, -2)] if type is GGMLType.Q5_K else []
        fields = [d, dmin, _k4_scales(blocks.scales, blocks.mins), *fifth, qs]
    return torch.cat(fields, -1).reshape(r, nb * type.type_size)


def unpack(data: torch.Tensor, type: GGMLType, in_features: int) -> Blocks:
    """The fields of the blocks in `data` uint8 [R, row_bytes]: the inverse of `pack`, bit for bit."""
    lay = layout(type)
    _check_data(data, type, in_features)
    r, nb = data.shape[0], in_features // type.block_size
    raw = data.reshape(r, nb, type.type_size)
    zero_half = torch.zeros(r, nb, dtype=torch.float16, device=data.device)
    no_sub = torch.zeros(r, nb, 0, dtype=torch.int16, device=data.device)
    if type is GGMLType.Q8_0:
        d, dmin, scales, mins = _bytes_half(raw[..., :2]), zero_half, no_sub, no_sub
        q = raw[..., 2:].contiguous().view(torch.int8).to(torch.int32) + lay.offset
    elif lay.family in (Family.LEGACY_SYMMETRIC, Family.LEGACY_AFFINE):
        d, rest = _bytes_half(raw[..., :2]), raw[..., 2:]
        dmin = zero_half
        if lay.family is Family.LEGACY_AFFINE:
            dmin, rest = _bytes_half(rest[..., :2]), rest[..., 2:]
        q = _unpack_planes(rest[..., -16:], 4, 2, -2).reshape(r, nb, 32)
        if lay.maxq == 31:
            q = q | (_unpack_planes(rest[..., :4], 1, 8, -1).reshape(r, nb, 32) << 4)
        scales = mins = no_sub
    elif type is GGMLType.Q2_K:
        sm = _unpack_planes(raw[..., :16], 4, 2, -2).to(torch.int16)
        scales, mins = sm[..., 0, :], sm[..., 1, :]
        q = _unpack_planes(raw[..., 16:80].reshape(r, nb, 2, 32), 2, 4, -2).reshape(r, nb, QK_K)
        d, dmin = _bytes_half(raw[..., 80:82]), _bytes_half(raw[..., 82:84])
    elif type is GGMLType.Q3_K:
        high = _unpack_planes(raw[..., :32], 1, 8, -2).reshape(r, nb, QK_K)
        low = _unpack_planes(raw[..., 32:96].reshape(r, nb, 2, 32), 2, 4, -2).reshape(r, nb, QK_K)
        q = low | (high << 2)
        scales, mins = _q3_unscales(raw[..., 96:108]), torch.zeros(r, nb, 16, dtype=torch.int16, device=data.device)
        d, dmin = _bytes_half(raw[..., 108:110]), zero_half
    elif type is GGMLType.Q6_K:
        low = _unpack_planes(raw[..., :128].reshape(r, nb, 2, 2, 32), 4, 2, -3).reshape(r, nb, QK_K)
        high = _unpack_planes(raw[..., 128:192].reshape(r, nb, 2, 32), 2, 4, -2).reshape(r, nb, QK_K)
        q = low | (high << 4)
        scales = raw[..., 192:208].contiguous().view(torch.int8).to(torch.int16)
        mins = torch.zeros_like(scales)
        d, dmin = _bytes_half(raw[..., 208:210]), zero_half
    else:
        d, dmin = _bytes_half(raw[..., :2]), _bytes_half(raw[..., 2:4])
        scales, mins = _k4_unscales(raw[..., 4:16])
        qs = raw[..., -128:].reshape(r, nb, 4, 32)
        q = _unpack_planes(qs, 4, 2, -2).reshape(r, nb, QK_K)
        if type is GGMLType.Q5_K:
            q = q | (_unpack_planes(raw[..., 16:48], 1, 8, -2).reshape(r, nb, QK_K) << 4)
    return Blocks(codes=q.reshape(r, -1).to(torch.uint8), d=d, dmin=dmin, scales=scales, mins=mins)


def _check_data(data: torch.Tensor, type: GGMLType, in_features: int) -> None:
    row_bytes = type.row_bytes(in_features)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
        raise FormatError(
            f"{type.value} rows of {in_features} weights are uint8 [rows, {row_bytes}], "
            f"got {data.dtype} {tuple(data.shape)}"
        )


# ------------------------------------------------------------------------------------------ public API

_FLOAT_VIEWS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def dequantize(data: torch.Tensor, type: GGMLType, in_features: int) -> torch.Tensor:
    """The float32 weights [N, in_features] stored in `data` uint8 [N, row_bytes] as `type`.

    Equal, bit for bit, to gguf-py's `gguf.quants.dequantize` (and so to ggml's decoders).
    """
    type = GGMLType(type)
    if type in _FLOAT_VIEWS:
        _check_data(data, type, in_features)
        return data.contiguous().view(_FLOAT_VIEWS[type]).float()
    return values(unpack(data, type, in_features), type)


def quantize(
    weight: torch.Tensor, type: GGMLType, importance: torch.Tensor | None = None, *, name: str = ""
) -> GGMLWeight:
    """`weight` [N, K] as llama.cpp's quantizer writes it in `type`, with `importance` [K] as its imatrix.

    `name` labels errors. Runs on the weight's device, in float32, a bounded number of rows at a time.

    >>> q = quantize(torch.ones(2, 32), GGMLType.Q8_0)  # d = 1/127, stored in fp16
    >>> q.data.shape, dequantize(q.data, GGMLType.Q8_0, 32).unique().tolist()
    (torch.Size([2, 34]), [0.99993896484375])
    """
    type = GGMLType(type)
    label = name or "weight"
    if not type.is_quantized:
        raise ConfigError(f"{label}: {type.value} is a float type, not a quantization grid")
    if weight.dim() != 2:
        raise SolverError(f"{label}: weight must be 2-D, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise SolverError(f"{label}: weight contains NaN or Inf")
    n, k = weight.shape
    try:
        type.row_bytes(k)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    if importance is not None:
        if tuple(importance.shape) != (k,):
            raise ConfigError(f"{label}: importance has shape {tuple(importance.shape)}, expected ({k},)")
        if not torch.isfinite(importance).all() or bool((importance < 0).any()):
            raise SolverError(f"{label}: importance must be finite and non-negative")
        importance = importance.to(device=weight.device, dtype=torch.float32)
    step = max(1, FIT_ELEMENTS // k)
    parts = [fit(weight[start : start + step].float(), type, importance) for start in range(0, n, step)]
    data = pack(cat_blocks(parts, 0), type)
    return GGMLWeight(data=data, scheme=GGMLScheme(type=type, importance=importance is not None), in_features=k)
