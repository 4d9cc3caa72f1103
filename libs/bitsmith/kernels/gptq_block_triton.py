"""The Triton kernel behind `bitsmith.kernels.gptq_block.solve_block_triton`.

A module of its own because `@triton.jit` needs Triton at import time: only `solve_block_triton`
imports it, on first use, so importing `bitsmith` or `bitsmith.algos` never loads Triton.
Read `gptq_block.solve_block_reference` first; this kernel computes the same function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUND_MAGIC = tl.constexpr(12582912.0)
"""1.5·2²³: (x + M) - M rounds a float32 |x| < 2²² half-to-even like torch.round. Larger values
land on a wrong integer, but every code is clamped to [0, maxq] right after, where both agree."""


@triton.jit
def gptq_block_kernel(
    block_ptr,
    u_ptr,
    scales_ptr,
    zeros_ptr,
    sel_ptr,
    codes_ptr,
    errors_ptr,
    n_rows,
    width,
    n_grids,
    block_stride,
    codes_stride,
    begin,
    end,
    maxq,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program owns BLOCK_N rows of the block and keeps them in registers for the whole run.

    Rows are independent given the factor, so programs never talk to each other; each column's
    quantize, error and rank-1 update of the rest of the block happen without leaving registers.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    row_ok = rows < n_rows
    col_ok = cols < width
    tile_ptrs = block_ptr + rows[:, None] * block_stride + cols[None, :]
    tile_mask = row_ok[:, None] & col_ok[None, :]
    tile = tl.load(tile_ptrs, mask=tile_mask, other=0.0)
    for i in tl.range(begin, end):
        column = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
        grid = tl.load(sel_ptr + (i - begin))
        scale = tl.load(scales_ptr + rows * n_grids + grid, mask=row_ok, other=1.0)
        zero = tl.load(zeros_ptr + rows * n_grids + grid, mask=row_ok, other=0.0)
        scaled = tl.math.div_rn(column, scale)
        code = (scaled + ROUND_MAGIC) - ROUND_MAGIC + zero
        code = tl.minimum(tl.maximum(code, 0.0), maxq)
        dequantized = scale * (code - zero)
        diagonal = tl.load(u_ptr + i * width + i)
        error = tl.math.div_rn(column - dequantized, diagonal)
        u_row = tl.load(u_ptr + i * width + cols, mask=col_ok & (cols >= i), other=0.0)
        tile = tile - error[:, None] * u_row[None, :]
        tl.store(codes_ptr + rows * codes_stride + i, code, mask=row_ok)
        tl.store(errors_ptr + rows * width + i, error, mask=row_ok)
    tl.store(tile_ptrs, tile, mask=tile_mask)


def launch(
    block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    sel: torch.Tensor,
    codes: torch.Tensor,
    errors: torch.Tensor,
    begin: int,
    end: int,
    maxq: int,
    block_n: int,
) -> None:
    """Launch one program per `block_n` rows (argument checking is the caller's)."""
    n, width = block.shape
    grid = (triton.cdiv(n, block_n),)
    gptq_block_kernel[grid](
        block,
        u_block,
        scales,
        zeros,
        sel,
        codes,
        errors,
        n,
        width,
        scales.shape[1],
        block.stride(0),
        codes.stride(0),
        begin,
        end,
        float(maxq),
        BLOCK_N=block_n,
        BLOCK_W=triton.next_power_of_2(width),
        num_warps=4,
    )
