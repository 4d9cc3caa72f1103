"""FP8 (e4m3) W8A8 linears: the one definition of the FP8 casts, a torch twin, and cuBLAS's FP8 GEMM.

Quantization (`bitsmith.algos.fp8`) and the runtime share `quantize_fp8_weight` and
`quantize_fp8_activation`, so a weight is cast exactly once and the same way everywhere: the scale
maps the absmax onto 448 (e4m3's largest finite value), values are clamped to ±448 before the cast
(e4m3fn has no infinity: an out-of-range cast would make NaN), and the cast rounds to nearest-even.

The layer computes ``y = (q_x · s_x) @ (q_w · s_w)ᵀ + bias`` with q_x the activation cast per token
(dynamic: s_x = row absmax / 448) or per tensor (static: a calibrated `input_scale`), and s_w one
float32 scale per tensor or per output channel. `fp8_linear_reference` defines it (float32 products,
one cast at the end); on CUDA devices with FP8 tensor cores (compute capability 8.9: Ada, Hopper and
later) `torch._scaled_mm` runs it, applying both scales to the float32 accumulator.

>>> w = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
>>> q, s = quantize_fp8_weight(w, per_channel=True)
>>> q.float().tolist(), [round(v, 6) for v in s.tolist()]
([[224.0, -448.0], [0.0, 0.0]], [0.002232, 1.0])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from bitsmith.errors import ConfigError, SolverError
from bitsmith.kernels import Candidate, Choice, KernelPreference, choose
from bitsmith.schemes import FP8_E4M3_MAX

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
"""The FP8 format of weights and activations (the OCP "fn" variant: no infinities, one NaN)."""

MIN_ACTIVATION_SCALE = 1e-12
"""Floor of a dynamic activation scale, so an all-zero token divides by something finite."""

MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores (and so cuBLASLt FP8 GEMMs) start with Ada (8.9) and Hopper (9.0)."""

GEMM_ALIGNMENT = 16
"""cuBLASLt's FP8 GEMMs want K and N multiples of 16, and some torch versions M too (M is padded)."""


def _cast(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values / scale, clamped to ±448, rounded to e4m3 (float32 in, float8 out)."""
    return (values / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def quantize_fp8_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] to (float8_e4m3fn [N, K], float32 scale [N] per channel or [1] per tensor).

    scale = absmax / 448, so the largest |w| lands on 448. A row (or tensor) of zeros gets scale 1 so
    it casts to exact zeros; a positive absmax too small for absmax / 448 to be a normal float32 gets
    the smallest normal instead, so no scale is 0 and no quotient overflows. Non-finite weights have
    no meaningful scale: `SolverError` naming the shape.
    """
    if w.dim() != 2:
        raise ConfigError(f"FP8 weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    wf = w.float()
    if not bool(torch.isfinite(wf).all()):
        raise SolverError(f"FP8 weight {tuple(w.shape)} contains NaN or Inf")
    absmax = wf.abs().amax(dim=1, keepdim=True) if per_channel else wf.abs().amax().reshape(1, 1)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(absmax > 0, (absmax / FP8_E4M3_MAX).clamp(min=tiny), torch.ones_like(absmax))
    return _cast(wf, scale), scale.reshape(-1)


def quantize_fp8_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] to (float8_e4m3fn [M, K], float32 scale [M, 1] per token or [1, 1] static).

    Dynamic (no `input_scale`): each row's absmax · (1/448), at least `MIN_ACTIVATION_SCALE`. Static: the
    calibrated per-tensor scale as given (values beyond 448 · scale saturate, as they do in every FP8
    runtime). Both the twin and the cuBLAS path call this, so they multiply the same FP8 numbers.
    """
    xf = x.float()
    if input_scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) * (1 / FP8_E4M3_MAX)).clamp(min=MIN_ACTIVATION_SCALE)
    else:
        scale = static_scale(input_scale, x.device)
    return _cast(xf, scale), scale


def static_scale(input_scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A calibrated activation scale as float32 [1, 1] on `device`; anything but one value is refused."""
    if input_scale.numel() != 1:
        raise ConfigError(f"static input_scale must hold one value, got shape {tuple(input_scale.shape)}")
    return input_scale.to(device=device, dtype=torch.float32).reshape(1, 1)


def _weight_scale(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The weight scale as float32 [1] (per tensor) or [N] (per channel), from any of [], [1], [N], [N, 1]."""
    n = weight.shape[0]
    flat = weight_scale.to(device=weight.device, dtype=torch.float32).reshape(-1)
    if flat.numel() not in (1, n):
        raise ConfigError(f"FP8 weight scale must hold 1 or {n} values for weight {tuple(weight.shape)}, "
                          f"got shape {tuple(weight_scale.shape)}")
    return flat


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ConfigError(f"FP8 weight must be float8_e4m3fn [out, in], got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ConfigError(f"input [..., {x.shape[-1]}] does not match FP8 weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch twin (any device): cast x to FP8 as the kernel does, dequantize both, multiply and add
    the bias in float32, cast to x.dtype."""
    _check(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.shape[1])
    xq, sx = quantize_fp8_activation(x2, input_scale)
    w = weight.float() * _weight_scale(weight, weight_scale)[:, None]
    y = (xq.float() * sx) @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def fp8_linear_scaled_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fp8_linear_reference` through `torch._scaled_mm` (cuBLASLt FP8 GEMM; checked by the chooser).

    Per-tensor x per-tensor scales go to the GEMM as two scalars; as soon as either side has a vector
    (per-token activations or per-channel weights) both are passed row-wise, scale_a [M, 1] and
    scale_b [1, N], and the GEMM writes bfloat16 (the one output type every torch build's row-wise
    FP8 GEMM supports; its rounding is far below the FP8 inputs' own). The weight goes in as
    ``weight.t()``, which is the column-major [K, N] operand cuBLASLt wants without a copy.
    """
    _check(x, weight, bias)
    lead = x.shape[:-1]
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    sw = _weight_scale(weight, weight_scale)
    # cuBLASLt wants M a multiple of 16 in some torch builds: the cast writes the padding rows as zeros.
    padded = -(-m // GEMM_ALIGNMENT) * GEMM_ALIGNMENT
    xq, sx = _quantize_activation_cuda(x2, input_scale, padded)
    rowwise = sx.numel() > 1 or sw.numel() > 1
    if rowwise:
        scale_a = sx.expand(padded, 1).contiguous()
        scale_b = sw.expand(n).reshape(1, n).contiguous()
        out_dtype = torch.bfloat16
    else:
        scale_a, scale_b = sx.reshape(1), sw.reshape(1)
        out_dtype = x.dtype
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)[:m]
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype).reshape(*lead, n)


def _quantize_activation_cuda(x: torch.Tensor, input_scale: torch.Tensor | None, rows: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_activation` in one fused Triton pass (`fp8_triton`), with zero rows up to `rows`."""
    from bitsmith.kernels.fp8_triton import quantize_fp8_activation_padded

    return quantize_fp8_activation_padded(x, None if input_scale is None else static_scale(input_scale, x.device),
                                          rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class FP8Spec:
    """What an implementation must support: device, activation dtype, GEMM sizes."""

    device_type: str
    capability: tuple[int, int] | None
    x_dtype: torch.dtype
    in_features: int
    out_features: int

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor) -> FP8Spec:
        device = x.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        n, k = weight.shape
        return cls(device_type=device.type, capability=capability, x_dtype=x.dtype, in_features=int(k),
                   out_features=int(n))


def can_implement_scaled_mm(spec: FP8Spec) -> tuple[bool, str]:
    """Whether cuBLAS's FP8 GEMM can compute `spec`, and if not, why."""
    if spec.device_type != "cuda" or spec.capability is None:
        return False, f"scaled_mm: needs a CUDA device, got {spec.device_type}"
    if spec.capability < MIN_CAPABILITY:
        return False, f"scaled_mm: FP8 tensor cores need compute capability >= {MIN_CAPABILITY}, got {spec.capability}"
    if spec.x_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"scaled_mm: activations must be float16/bfloat16/float32, got {spec.x_dtype}"
    if spec.in_features % GEMM_ALIGNMENT or spec.out_features % GEMM_ALIGNMENT:
        return False, (f"scaled_mm: K = {spec.in_features} and N = {spec.out_features} must be multiples of "
                       f"{GEMM_ALIGNMENT}")
    if not hasattr(torch, "_scaled_mm"):
        return False, "scaled_mm: not in this torch build"
    return True, f"scaled_mm: CUDA capability {spec.capability}"


FP8Linear = Callable[..., torch.Tensor]


FP8Choice = Choice[FP8Linear]


def choose_fp8(spec: FP8Spec, preference: KernelPreference = KernelPreference.AUTO) -> FP8Choice:
    """The FP8 GEMM for `spec`; `KernelPreference.TRITON` here means "the fast path or an error"
    (cuBLAS's FP8 GEMM already runs near peak, so there is no Triton kernel to prefer)."""
    return choose(spec, preference, [Candidate("scaled_mm", fp8_linear_scaled_mm, can_implement_scaled_mm)],
                  fp8_linear_reference, problem="FP8 GEMM", log=log, slow_path="FP8 linear")


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    preference: KernelPreference = KernelPreference.AUTO,
) -> torch.Tensor:
    """``(q_x · s_x) @ (weight · weight_scale)ᵀ + bias`` in x.dtype: cuBLAS FP8 where it runs, else the twin."""
    _check(x, weight, bias)
    return _cached_choice(FP8Spec.of(x, weight), preference).run(x, weight, weight_scale, input_scale, bias)


_cached_choice = cache(choose_fp8)
"""Per-call dispatch at decode speed: a spec's choice never changes within a process."""


__all__ = [
    "FP8_DTYPE",
    "FP8Choice",
    "FP8Spec",
    "can_implement_scaled_mm",
    "choose_fp8",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_linear_scaled_mm",
    "quantize_fp8_activation",
    "quantize_fp8_weight",
]
