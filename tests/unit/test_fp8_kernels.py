"""FP8 W8A8: the weight and activation casts (the one definition quantization and runtime share), the
torch twin against an independent float64 formula, scale layouts, refusals and the chooser."""

from __future__ import annotations

import pytest
import torch
from bitsmith.errors import ConfigError, SolverError, UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.fp8 import (
    FP8_DTYPE,
    FP8Spec,
    can_implement_scaled_mm,
    choose_fp8,
    fp8_linear,
    fp8_linear_reference,
    quantize_fp8_activation,
    quantize_fp8_weight,
)

E4M3_MAX = 448.0


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_round_trip_is_within_e4m3_precision(per_channel: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=gen) * torch.logspace(-3, 1, 24).unsqueeze(1)
    q, scale = quantize_fp8_weight(w, per_channel=per_channel)
    assert q.dtype == FP8_DTYPE and tuple(q.shape) == (24, 96)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == ((24,) if per_channel else (1,))
    back = q.float() * scale.unsqueeze(1)
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    torch.testing.assert_close(scale, absmax / E4M3_MAX)
    # The largest |w| of each row (tensor) lands exactly on ±448.
    assert torch.equal(q.float().abs().amax(dim=1 if per_channel else None).unique(), torch.tensor([E4M3_MAX]))
    # Three mantissa bits: a normal e4m3 value is within 2^-4 of the weight (relative); values below
    # e4m3's smallest normal (2^-6 · scale) are within half of its subnormal step, 2^-10 · scale.
    tolerance = torch.maximum(w.abs() / 16, scale.unsqueeze(1) * 2.0**-10)
    assert bool(((back - w).abs() <= tolerance).all())


def test_zero_rows_are_exact_and_scales_finite() -> None:
    w = torch.randn(6, 32)
    w[2] = 0.0
    w[4] = 1e-44  # a subnormal float32: absmax / 448 underflows
    q, scale = quantize_fp8_weight(w, per_channel=True)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert scale[2].item() == 1.0 and torch.equal(q[2].float(), torch.zeros(32))
    assert bool(torch.isfinite(q.float()).all())
    q, scale = quantize_fp8_weight(torch.zeros(3, 16), per_channel=False)
    assert scale.tolist() == [1.0] and torch.equal(q.float(), torch.zeros(3, 16))


def test_refuses_non_finite_and_non_matrix_weights() -> None:
    w = torch.randn(5, 8)
    w[1, 3] = float("nan")
    with pytest.raises(SolverError, match=r"\(5, 8\) contains NaN or Inf"):
        quantize_fp8_weight(w, per_channel=True)
    w[1, 3] = float("inf")
    with pytest.raises(SolverError, match=r"\(5, 8\)"):
        quantize_fp8_weight(w, per_channel=False)
    with pytest.raises(ConfigError, match="2-D"):
        quantize_fp8_weight(torch.randn(8), per_channel=True)


def test_dynamic_activation_scales_are_per_token_and_static_saturates() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1.0, -1.0]])
    q, scale = quantize_fp8_activation(x)
    assert tuple(scale.shape) == (3, 1)
    torch.testing.assert_close(scale[:, 0], torch.tensor([2.0 / E4M3_MAX, 1e-12, 300.0 / E4M3_MAX]))
    assert q.float()[0, 1].item() == -E4M3_MAX and torch.equal(q.float()[1], torch.zeros(3))
    q, scale = quantize_fp8_activation(x, torch.tensor(0.5))
    assert tuple(scale.shape) == (1, 1) and scale.item() == 0.5
    assert q.float()[2, 0].item() == E4M3_MAX  # 300 / 0.5 = 600 saturates instead of becoming NaN
    assert q.float()[0].tolist() == [2.0, -4.0, 1.0]
    with pytest.raises(ConfigError, match="one value"):
        quantize_fp8_activation(x, torch.ones(3))


def _independent(x: torch.Tensor, w: torch.Tensor, per_channel: bool, input_scale: float | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 product spelled out element by element in float64, sharing only torch's e4m3 cast."""

    def cast(v: torch.Tensor) -> torch.Tensor:
        return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float32).to(torch.float8_e4m3fn).double()

    w64, x64 = w.double(), x.double()
    w_scale = (w64.abs().amax(dim=1, keepdim=True) if per_channel else w64.abs().amax()) / E4M3_MAX
    wq = cast(w64.float().double() / w_scale.float().double()) * w_scale.float().double()
    rows = []
    for row in x64:
        s = torch.tensor(input_scale, dtype=torch.float64) if input_scale is not None else row.abs().max() / E4M3_MAX
        s = s.float().double()
        rows.append((cast(row / s) * s) @ wq.T)
    y = torch.stack(rows)
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("input_scale", [None, 0.02])
def test_twin_matches_an_independent_formula(per_channel: bool, input_scale: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen) * 0.05
    x = torch.randn(7, 64, generator=gen) * torch.logspace(-1, 1, 7).unsqueeze(1)
    bias = torch.randn(32, generator=gen)
    q, scale = quantize_fp8_weight(w, per_channel=per_channel)
    static = None if input_scale is None else torch.tensor([input_scale])
    y = fp8_linear(x, q, scale, static, bias)
    expected = _independent(x, w, per_channel, input_scale, bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_scale_layouts_and_dtypes_agree() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=gen)
    x = torch.randn(2, 3, 32, generator=gen)
    q, scale = quantize_fp8_weight(w, per_channel=True)
    y = fp8_linear(x, q, scale)
    assert tuple(y.shape) == (2, 3, 16)
    torch.testing.assert_close(fp8_linear(x, q, scale.reshape(16, 1)), y, rtol=0, atol=0)
    q, scale = quantize_fp8_weight(w, per_channel=False)
    per_tensor = fp8_linear(x, q, scale)
    for layout in (scale.reshape(()), scale.expand(16), scale.expand(16).reshape(16, 1)):
        torch.testing.assert_close(fp8_linear(x, q, layout), per_tensor, rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):
        half = fp8_linear(x.to(dtype), q, scale)
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), fp8_linear_reference(x.to(dtype).float(), q, scale),
                                   rtol=1e-2, atol=1e-2)
    with pytest.raises(ConfigError, match="1 or 16 values"):
        fp8_linear(x, q, torch.ones(4))
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        fp8_linear(x, w, scale)
    with pytest.raises(ConfigError, match=r"input \[..., 32\]"):
        fp8_linear(x, q[:, :16], scale)


def test_chooser_says_why_and_honours_preferences() -> None:
    q, _ = quantize_fp8_weight(torch.randn(16, 32), per_channel=True)
    spec = FP8Spec.of(torch.randn(1, 32), q)
    choice = choose_fp8(spec)
    assert (choice.name, choice.reason) == ("reference", "scaled_mm: needs a CUDA device, got cpu")
    assert choose_fp8(spec, KernelPreference.REFERENCE).reason == "reference forced by preference"
    with pytest.raises(UnsupportedError, match="needs a CUDA device"):
        choose_fp8(spec, KernelPreference.TRITON)
    ampere = FP8Spec(device_type="cuda", capability=(8, 0), x_dtype=torch.bfloat16, in_features=32, out_features=16)
    assert "capability >= (8, 9)" in can_implement_scaled_mm(ampere)[1]
    odd = FP8Spec(device_type="cuda", capability=(9, 0), x_dtype=torch.bfloat16, in_features=40, out_features=16)
    assert "multiples of 16" in can_implement_scaled_mm(odd)[1]
    hopper = FP8Spec(device_type="cuda", capability=(9, 0), x_dtype=torch.bfloat16, in_features=32, out_features=16)
    assert can_implement_scaled_mm(hopper)[0]
