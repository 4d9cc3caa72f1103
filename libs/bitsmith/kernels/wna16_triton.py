"""The Triton GEMM behind `bitsmith.kernels.wna16.wna16_linear_triton`: ``y = x @ dequant(W)``.

A module of its own because `@triton.jit` needs Triton at import time: only the chooser's Triton path
imports it, on first launch. Read `wna16.wna16_linear_reference` first; this computes the same
function (x already gathered by `perm`, so groups are contiguous runs of `group_size` inputs).

Why two launch shapes of one kernel:

* Decode and small batches (M ≤ 64, or too few output tiles to fill the GPU) are bound by reading
  the weight once. An output tile per program gives 4096x14336 only 112 programs of 128 columns for
  132 SMs, each walking all of K serially, so the copy engines never see enough loads in flight.
  Split-K cuts K into chunks, one program per (tile, chunk), and adds the partial sums into a float32
  buffer with atomics (then one cast): several programs per SM stream disjoint weight bytes at once.
  At M = 1 the product is a row times a matrix, done as multiply-and-sum in float32 (a tensor-core
  tile would be 15/16 padding); from M = 2 up, `tl.dot` on 16-row tiles.
* Larger M is compute bound like any GEMM: a conventional tiled kernel (grouped tile order for L2
  reuse of x), dequantizing each weight tile into the activation dtype in registers and feeding it to
  `tl.dot`, so the tensor cores see an ordinary fp16/bf16 product and the weight costs a quarter (int4)
  of bf16's bytes.

In both, one K-tile never spans two groups (BLOCK_K divides group_size), so a tile reads one row of
scales and zeros per column instead of one per element, and the int32 words are loaded once and split
into their `32 // bits` fields in registers, never re-loaded per field. The M = 1 path multiplies field
by field (field j of every word in the tile against the inputs j, j + PACK, ...) and sums over K once,
after the loop; the tl.dot paths shift-and-mask into a [ROWS, PACK, BLOCK_N] tensor and reshape it to
[BLOCK_K, BLOCK_N], input order.

Codes become floats by the mantissa trick (`minus_zero`). At M = 1 x multiplies ``c - z`` and the scale
is applied to each K-tile's sums, once per column rather than per weight (on an H100 70 against 78 µs
for 8192x28672); the tl.dot paths scale each weight, which measured the same at M = 16 and faster on the
tiled path (392 against 514 µs at M = 256), where a per-tile multiply of the whole output tile costs more
than it saves.

What limits it, measured on an H100 (docs/benchmarks.md, SASS counted per K-tile): at M = 1 the loop
issues about 3.9 integer-pipe instructions per 4-bit weight (shift, mask-and-or, sign extension, and
the address and bf16-to-float arithmetic of x's loads) besides 2.3 float ones. 70% of the copy
bandwidth asks about 16 weights per SM clock, so 62 integer instructions against Hopper's 64 integer
lanes per SM: the kernel tops out near 60%, while 8-bit codes, half as many per byte, reach 74-88%.
From M = 2 up, the dequantized tile reaches tl.dot through shared memory one 16-bit store per weight,
because the reshape interleaves fields across registers. Neither the int-to-float conversion (the
mantissa trick gained about 2%), hand prefetching (nothing) nor swapping tl.dot's operands (slower)
moved those limits; the next steps are fewer integer instructions per weight (packed fp16x2 work on
two codes at once, x converted once per tile) and a packing order the dot's operand layout can store
in vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from bitsmith.kernels.wna16 import PackedLinear

MAGIC = tl.constexpr(0x4B000000)
"""The bits of the float32 2**23: OR-ing an unsigned code below 2**23 into them gives the float 2**23 + code."""


@triton.jit
def minus_zero(codes, zero):
    """``codes - zero`` in float32, exactly (both are small integers), without an int-to-float conversion:
    a logic op puts the code in the mantissa of 2**23 and one subtraction takes 2**23 + zero away."""
    return (codes | MAGIC).to(tl.float32, bitcast=True) - (zero + 8388608.0)


@triton.jit
def load_k_tile(qweight_ptr, scales_ptr, zeros_ptr, kt, N, offs_n, n_ok, row, ROWS: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """K-tile `kt`'s words [ROWS, BLOCK_N] and its group's scales and zero points (float32 [BLOCK_N])."""
    words = tl.load(qweight_ptr + (kt * ROWS + row)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
    group = (kt * BLOCK_K) // GROUP_SIZE
    scale = tl.load(scales_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return words, scale, zero


@triton.jit
def wna16_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WAVES: tl.constexpr,
):
    """Program (tile, chunk): output tile [BLOCK_M, BLOCK_N] summed over its share of K.

    Grid: (tiles of M x tiles of N, K chunks). With ATOMIC the float32 partial sums are added into a
    zeroed float32 `out`; without, there is one chunk and the tile is stored in out's dtype. `m_bucket`
    (autotune key) and WAVES (split-K depth, read by the grid function) are not used here. BLOCK_M = 1
    is the multiply-and-sum path, one row of x per program, scale applied to each K-tile's sums.
    """
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = BLOCK_K // PACK
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive programs share a column tile of the weight (and walk rows of
    # x), so at large M the weight tile and x rows stay in L2 across neighbouring programs.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    row = tl.arange(0, ROWS)

    k_tiles = K // BLOCK_K
    chunk = tl.cdiv(k_tiles, tl.num_programs(1))
    first = pid_k * chunk
    last = tl.minimum(first + chunk, k_tiles)

    if BLOCK_M == 1:
        # Products summed over K only once, after the loop: a per-tile reduction across threads would
        # cost more than the multiply-adds it serves.
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for kt in range(first, last):
            words, scale, zero = load_k_tile(qweight_ptr, scales_ptr, zeros_ptr, kt, N, offs_n, n_ok, row, ROWS,
                                             BLOCK_K, GROUP_SIZE)
            # Field j of word r is input kt·BLOCK_K + r·PACK + j: multiply it by those inputs of x.
            part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PACK):
                w = minus_zero((words >> (j * BITS)) & MASK, zero[None, :])
                x = tl.load(x_ptr + pid_m * stride_xm + kt * BLOCK_K + row * PACK + j).to(tl.float32)
                part += x[:, None] * w
            acc += part * scale[None, :]
        result = tl.sum(acc, axis=0)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        shifts = tl.arange(0, PACK) * BITS
        for kt in range(first, last):
            words, scale, zero = load_k_tile(qweight_ptr, scales_ptr, zeros_ptr, kt, N, offs_n, n_ok, row, ROWS,
                                             BLOCK_K, GROUP_SIZE)
            codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
            w = minus_zero(codes, zero[None, :]) * scale[None, :]
            offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x, w.to(DTYPE), acc)
        result = acc
    if HAS_BIAS:
        # Only the first chunk adds the bias, so split-K sums it once.
        first_chunk = (offs_n * 0 + pid_k) == 0  # a vector: scalar masks do not broadcast everywhere
        bias = tl.load(bias_ptr + offs_n, mask=n_ok & first_chunk, other=0.0).to(tl.float32)
        result += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, result, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


SPLIT_MAX_M = 64
"""Up to this many rows the weight read dominates: split-K, whatever the shape."""

TILE = 128
"""Nominal output tile of the tiled path, used only to decide whether it would fill the GPU."""

MIN_K_TILES_PER_CHUNK = 4
"""A split-K chunk keeps at least this many K-tiles, so its loads still pipeline."""


def m_bucket(m: int) -> int:
    """The autotune key's M class: 1, then powers of two up to 4096 (decode, small batch, prefill)."""
    return 1 if m <= 1 else min(triton.next_power_of_2(m), 4096)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, waves: int = 1, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "WAVES": waves},
        num_warps=warps,
        num_stages=stages,
    )


SPLIT_CONFIGS = [
    # M = 1: multiply-and-sum (no tl.dot, so nothing for Triton to pipeline: one stage); many programs per
    # SM keep loads in flight instead. WAVES = programs per SM to aim for.
    *(_config(1, bn, bk, 4, 1, waves)
      for bn, bk in [(64, 128), (128, 128), (256, 64), (128, 64), (128, 32)]
      for waves in (8, 16)),
    # 2 ≤ M ≤ 64 (and small-N larger M): tensor cores on 16..128-row tiles.
    *(_config(bm, bn, bk, w, s, waves)
      for bm in (16, 32, 64)
      for bn, bk, w, s in [(128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (256, 64, 8, 3), (128, 32, 4, 5)]
      for waves in (2, 4)),
    *(_config(128, bn, bk, 8, 3, waves) for bn, bk in [(128, 64), (64, 64), (128, 32)] for waves in (1, 2)),
]

TILED_CONFIGS = [
    *(_config(bm, bn, bk, w, s)
      for bm, bn, bk, w, s in [
          (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
          (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 32, 4, 4),
          (128, 256, 32, 8, 3), (64, 64, 32, 4, 4),
      ]),
]


def _fits(config: triton.Config, args: dict[str, Any], split: bool) -> bool:
    """Whether `config` can run this problem sensibly (BLOCK_K within one group, K a whole number of
    K-tiles, row tiles no taller than the M class; M = 1 only on the multiply-and-sum path)."""
    meta = config.kwargs
    bucket, group = args["m_bucket"], args["GROUP_SIZE"]
    if group % meta["BLOCK_K"] or args["K"] % meta["BLOCK_K"]:
        return False
    if not split:
        return meta["BLOCK_M"] <= max(64, bucket)
    if bucket == 1:
        return meta["BLOCK_M"] == 1
    return 16 <= meta["BLOCK_M"] <= max(16, min(bucket, 128))


def _prune(split: bool) -> Callable[..., list[triton.Config]]:
    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        kept = [c for c in configs if _fits(c, args, split)]
        # Every group size the chooser admits (a multiple of 32) fits some BLOCK_K = 32 config.
        return kept or [c for c in configs if c.kwargs["BLOCK_K"] == 32][:1]

    return prune


KEY = ["m_bucket", "N", "K", "BITS", "GROUP_SIZE", "HAS_BIAS"]

split_k_kernel = triton.autotune(
    configs=SPLIT_CONFIGS, key=KEY, prune_configs_by={"early_config_prune": _prune(True)}, reset_to_zero=["out_ptr"]
)(wna16_kernel)
"""Decode / small-M launches (float32 atomics into a zeroed buffer); tuned per (M class, N, K, grid)."""

tiled_kernel = triton.autotune(
    configs=TILED_CONFIGS, key=KEY, prune_configs_by={"early_config_prune": _prune(False)}
)(wna16_kernel)
"""Large-M launches (one chunk, direct store in the activation dtype)."""


def split_chunks(tiles: int, k_tiles: int, processors: int, waves: int) -> int:
    """K chunks for split-K: enough programs for `waves` per SM, each keeping a few K-tiles."""
    wanted = triton.cdiv(waves * processors, max(tiles, 1))
    return max(1, min(wanted, k_tiles // MIN_K_TILES_PER_CHUNK))


def uses_split_k(m: int, n: int, processors: int) -> bool:
    """Split-K for small M, and for any M whose output has too few 128x128 tiles to fill the GPU."""
    return m <= SPLIT_MAX_M or triton.cdiv(m, TILE) * triton.cdiv(n, TILE) < processors


def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def matmul(x: torch.Tensor, packed: PackedLinear, *, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ dequant(W) + bias`` for x [M, K] contiguous, already gathered by `packed.perm`.

    `config` (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT: K chunks, 0 = the tiled path; optional
    num_warps, num_stages) bypasses the autotuner: tests and the CPU interpreter use it to run a chosen
    variant.
    """
    m, k = x.shape
    n = packed.out_features
    processors = _processors(x.device)
    bias = packed.bias if packed.bias is not None else packed.scales  # any tensor; unread without HAS_BIAS
    split = uses_split_k(m, n, processors) if config is None else config["SPLIT"] > 0
    out = (
        torch.zeros((m, n), device=x.device, dtype=torch.float32)
        if split
        else torch.empty((m, n), device=x.device, dtype=x.dtype)
    )
    args = (x, packed.qweight, packed.scales, packed.zeros, bias, out, m, n, k, m_bucket(m), x.stride(0), out.stride(0))
    flags: dict[str, Any] = {
        "BITS": packed.bits,
        "GROUP_SIZE": packed.group_size,
        "HAS_BIAS": packed.bias is not None,
        "ATOMIC": split,
    }
    if config is not None:
        meta = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"]}
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        grid = (tiles, max(1, config["SPLIT"]))
        wna16_kernel[grid](*args, **flags, **meta, GROUP_M=8, WAVES=1,
                           num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    elif split:

        def split_grid(meta: dict[str, Any]) -> tuple[int, int]:
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return tiles, split_chunks(tiles, k // meta["BLOCK_K"], processors, meta["WAVES"])

        split_k_kernel[split_grid](*args, **flags)
    else:

        def tiled_grid(meta: dict[str, Any]) -> tuple[int, int]:
            return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1

        tiled_kernel[tiled_grid](*args, **flags)
    return out.to(x.dtype) if split else out
