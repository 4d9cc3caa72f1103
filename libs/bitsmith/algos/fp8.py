"""FP8 quantization of a linear: weights onto the float8 e4m3 grid, activations' static scale.

Why round to nearest and not a solve: e4m3 keeps three mantissa bits at every magnitude, so a weight's
relative rounding error is at most 1/16 wherever it lies in the range; with a scale per output row the
H-weighted error is already small next to int4's, and the quality loss of W8A8 FP8 comes mostly from
the activations, which no weight solve can fix. The cast itself is `bitsmith.kernels.fp8`'s, the one
definition the runtime's kernels use too.
"""

from __future__ import annotations

import math

import torch

from bitsmith.errors import BitsmithError, CalibrationError
from bitsmith.kernels.fp8 import quantize_fp8_weight
from bitsmith.quantized import FP8Weight
from bitsmith.schemes import FP8_E4M3_MAX, FP8Scheme


def quantize_fp8(weight: torch.Tensor, scheme: FP8Scheme, *, name: str, input_absmax: float | None = None
                 ) -> FP8Weight:
    """`weight` [N, K] on `scheme`'s grid; static activations take their scale from `input_absmax`, the
    largest |input| the calibration set fed this linear (`CalibrationError` without one)."""
    try:
        data, scale = quantize_fp8_weight(weight.float(), per_channel=scheme.per_channel)
    except BitsmithError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    input_scale = None
    if scheme.static_activations:
        if input_absmax is None or not math.isfinite(input_absmax) or input_absmax < 0:
            raise CalibrationError(f"{name}: {scheme.label} needs the input's absmax from calibration, "
                                   f"got {input_absmax}")
        input_scale = torch.tensor([max(input_absmax, 1e-12) / FP8_E4M3_MAX], dtype=torch.float32)
    return FP8Weight(data=data, scale=scale.reshape(-1).float(), scheme=scheme, input_scale=input_scale)
