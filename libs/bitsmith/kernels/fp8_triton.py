"""One Triton pass that casts activations to FP8 for cuBLAS's FP8 GEMM: `fp8.quantize_fp8_activation`, fused.

Why: in torch the per-token cast is six elementwise passes (upcast, abs, row max, divide, clamp, cast)
over float32 copies of x. At M = 4096, K = 8192 that is about 1.2 GB of traffic, some 400 µs on an
H100 — a quarter of the FP8 GEMM it feeds, which would eat most of FP8's gain over bf16. This kernel
reads x once for the row maxima and once more (from cache) for the cast, and writes one byte a value.

It computes the same numbers as the torch definition: the scale is max(row absmax · float32(1/448),
`MIN_ACTIVATION_SCALE`) (a product, because torch on CUDA divides by a Python number as a product with its
reciprocal, and a division here differed from it in the last bit), the quotient is an IEEE division, clamped to ±448
and rounded to nearest-even (tests/gpu checks bit equality). It also writes the rows cuBLAS wants as
padding (M up to a multiple of 16) as zeros, so the GEMM's input needs no second copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitsmith.kernels.fp8 import FP8_DTYPE, MIN_ACTIVATION_SCALE
from bitsmith.schemes import FP8_E4M3_MAX


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, M, K, stride_x,
                          FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, STATIC: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Program r: row r of q (and, dynamic, of scale); rows ≥ M are written as zeros."""
    row = tl.program_id(0)
    live = row < M
    x_row = x_ptr + row.to(tl.int64) * stride_x
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=(offs < K) & live, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
        scale = tl.maximum(tl.max(absmax, axis=0) * (1 / FP8_MAX), MIN_SCALE)
        tl.store(scale_ptr + row, scale)
    q_row = q_ptr + row.to(tl.int64) * K
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=(offs < K) & live, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_row + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=offs < K)


def quantize_fp8_activation_padded(x: torch.Tensor, input_scale: torch.Tensor | None, rows: int
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] on CUDA to (float8 [rows, K], float32 scale [rows, 1] dynamic, or `input_scale`, a float32
    [1, 1] on x's device, static), rows ≥ M; rows past M are zeros (their dynamic scale is the floor, which
    multiplies only zeros)."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((rows, k), device=x.device, dtype=FP8_DTYPE)
    static = input_scale is not None
    # Static: the float32 [1, 1] scale on x's device (`fp8.static_scale`); dynamic: one per row, written here.
    scale = input_scale if input_scale is not None else torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_rows_kernel[(rows,)](x, q, scale, scale, m, k, x.stride(0), FP8_MAX=FP8_E4M3_MAX,
                                   MIN_SCALE=MIN_ACTIVATION_SCALE, STATIC=static, BLOCK_K=block,
                                   num_warps=4 if block <= 1024 else 8)
    return q, scale
