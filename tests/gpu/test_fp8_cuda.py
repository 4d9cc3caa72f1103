"""FP8 W8A8 on CUDA: cuBLAS's FP8 GEMM (`torch._scaled_mm`) and the fused activation cast against the torch twin.

Skipped without CUDA or FP8 tensor cores (compute capability < 8.9); run on a GPU machine with
`python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

import pytest
import torch
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.fp8 import fp8_linear, fp8_linear_reference, quantize_fp8_activation, quantize_fp8_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs CUDA with FP8 tensor cores",
    ),
]


@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 16, 64, 257, 4096])
def test_scaled_mm_matches_twin(per_channel: bool, static: bool, dtype: torch.dtype, m: int) -> None:
    k, n = 4096, 1024
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    q, scale = quantize_fp8_weight(w, per_channel=per_channel)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    input_scale = (x.float().abs().amax() / 448).reshape(1) if static else None
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    y = fp8_linear(x, q, scale, input_scale, bias, preference=KernelPreference.TRITON)
    ref = fp8_linear_reference(x, q, scale, input_scale, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    # Same FP8 inputs on both sides; only float32 summation order and the row-wise GEMM's bf16 output
    # differ.
    step = 2.0**-8 * ref.float().abs().max()
    assert (y.float() - ref.float()).abs().max() <= 2 * step


def test_batched_input() -> None:
    q, scale = quantize_fp8_weight(torch.randn(4096, 4096, device="cuda"), per_channel=True)
    x = torch.randn(2, 3, 4096, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, q, scale, preference=KernelPreference.TRITON)
    torch.testing.assert_close(y.float(), fp8_linear_reference(x, q, scale).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize(("m", "k", "rows"), [(1, 4096, 16), (5, 1000, 16), (300, 14336, 304), (4096, 8192, 4096)])
def test_fused_activation_cast_is_the_torch_cast_bit_for_bit(static: bool, m: int, k: int, rows: int) -> None:
    from bitsmith.kernels.fp8_triton import quantize_fp8_activation_padded  # Triton: only where CUDA is

    gen = torch.Generator(device="cuda").manual_seed(m + k)
    x = (torch.randn(m, k, generator=gen, device="cuda") * torch.rand(m, 1, generator=gen, device="cuda") * 8)
    # A static scale below the absmax, so the largest values saturate at ±448 (taken before row 0 is zeroed:
    # at M = 1 nothing else is left).
    input_scale = (x.abs().amax() / 448 / 2).reshape(1, 1) if static else None
    x[0] = 0  # an all-zero token takes the floor scale
    x = x.to(torch.bfloat16)
    q, scale = quantize_fp8_activation_padded(x, input_scale, rows)
    want_q, want_scale = quantize_fp8_activation(x, input_scale)
    assert q.shape == (rows, k) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(q[:m].view(torch.uint8), want_q.view(torch.uint8))
    assert not q[m:].float().any()
    assert torch.equal(scale[:m] if not static else scale, want_scale)
