"""The W4A16 / W8A16 Triton kernel against its torch twin on CUDA, for Llama-shaped layers.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu -q`. The
first call of each shape class autotunes, so the first run takes a few minutes.
"""

from __future__ import annotations

import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.wna16 import pack_for_kernel, wna16_linear, wna16_linear_reference
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SHAPES = [(4096, 14336), (8192, 28672), (4096, 4096), (4096, 1024), (14336, 4096)]  # (K, N)
MS = [1, 4, 16, 64, 256, 4096]
GRIDS = {  # name: (bits, group, sym, act_order)
    "w4-g128-asym": (4, 128, False, False),
    "w4-g128-sym": (4, 128, True, False),
    "w4-g128-actorder": (4, 128, False, True),
    "w8-channel-sym": (8, -1, True, False),
    "w4-g32-asym": (4, 32, False, False),
}


def _packed(k: int, n: int, grid: tuple[int, int, bool, bool], dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    bits, group, sym, act = grid
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qw = quantize_rtn(torch.randn(n, k, generator=gen, device="cuda") * 0.02,
                      QuantScheme(bits=bits, group_size=group, sym=sym))
    if act:
        order = torch.randperm(k, generator=gen, device="cuda")
        qw = QuantizedWeight(codes=qw.codes[:, order], scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[order],
                             scheme=qw.scheme)
    return pack_for_kernel(qw, dtype, "cuda", bias=torch.randn(n, device="cuda", generator=gen) * 0.1)


def _check(x: torch.Tensor, packed) -> None:  # type: ignore[no-untyped-def]
    y = wna16_linear(x, packed, KernelPreference.TRITON)
    ref = wna16_linear_reference(x, packed)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # The kernel rounds each dequantized weight to x's dtype before tl.dot (the twin stays in float32)
    # and sums in another order: allow a few output rounding steps at the output's scale.
    step = torch.finfo(x.dtype).eps * ref.float().abs().max()
    err = (y.float() - ref.float()).abs().max()
    assert err <= 8 * step, f"max error {err:.3e} vs step {step:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_w4_g128_asym_all_m(shape: tuple[int, int], dtype: torch.dtype) -> None:
    k, n = shape
    packed = _packed(k, n, GRIDS["w4-g128-asym"], dtype, seed=k + n)
    for m in MS:
        _check(torch.randn(m, k, device="cuda", dtype=dtype), packed)


@pytest.mark.parametrize("grid", [g for g in GRIDS if g != "w4-g128-asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_other_grids(grid: str, dtype: torch.dtype) -> None:
    k, n = 4096, 14336
    packed = _packed(k, n, GRIDS[grid], dtype, seed=len(grid))
    for m in (1, 16, 256):
        _check(torch.randn(m, k, device="cuda", dtype=dtype), packed)


def test_batched_input_and_odd_m() -> None:
    packed = _packed(4096, 4096, GRIDS["w4-g128-actorder"], torch.bfloat16, seed=5)
    _check(torch.randn(3, 7, 4096, device="cuda", dtype=torch.bfloat16), packed)
    _check(torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16), packed)


@pytest.mark.parametrize("grid", ["w4-g128-actorder", "w4-g128-sym", "w8-channel-sym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_launch_shape_with_a_chosen_config(grid: str, dtype: torch.dtype) -> None:
    """Each launch shape on a config of its own, whatever the autotuner would keep."""
    from bitsmith.kernels import wna16_triton

    k, n = 4096, 1024
    packed = _packed(k, n, GRIDS[grid], dtype, seed=7)
    for m, config in [(1, dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=128, SPLIT=4)),
                      (16, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT=4)),
                      (300, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT=0, num_warps=8, num_stages=3))]:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        gathered = x if packed.perm is None else x[:, packed.perm]
        y = wna16_triton.matmul(gathered.contiguous(), packed, config=config)
        ref = wna16_linear_reference(x, packed).float()
        step = torch.finfo(dtype).eps * ref.abs().max()
        assert (y.float() - ref).abs().max() <= 8 * step, (m, config)
