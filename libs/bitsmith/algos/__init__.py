"""Quantization methods behind one calling convention, so services never branch on the method.

Every method is a `MethodSpec`: a `Solver` taking
(weight [N, K], hessian [K, K] or None, scheme, options, name) and returning a `GPTQResult`. AWQ's
block rescaling (`bitsmith.algos.awq`) runs before the solve, so its solvers are RTN's and GPTQ's
applied to the rescaled weights.

The scheme's type picks the grid: a `QuantScheme` is an integer grid, a `GGMLScheme` a ggml block
type, which RTN fills as llama-quantize does (`bitsmith.algos.kquant`, with the Hessian diagonal as
its importance matrix when there is a Hessian and the scheme asks for it) and GPTQ solves on
(`bitsmith.algos.kquant_gptq`). `GPTQOptions.grid_search` applies to integer grids only: a ggml
type's block search is llama.cpp's own.

>>> get_method(Method.AWQ).solve.__name__
'_solve_rtn'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from bitsmith.algos import kquant
from bitsmith.algos.fp8 import quantize_fp8
from bitsmith.algos.gptq import GPTQResult, hessian_row_errors, solve_gptq, split_rows
from bitsmith.algos.gptq_reference import solve_gptq_reference
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.errors import CalibrationError, UnsupportedError
from bitsmith.quantized import Quantized
from bitsmith.schemes import FP8Scheme, GGMLScheme, GPTQOptions, Method, Scheme


class Solver(Protocol):
    """The calling convention every method's solver follows."""

    def __call__(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor | None,
        scheme: Scheme,
        options: GPTQOptions,
        name: str,
        *,
        input_absmax: float | None = None,
    ) -> GPTQResult: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodSpec:
    """The function that runs a method (whether it needs calibration is `Method.needs_calibration`), and
    whether it fits the layer's outputs on calibration data, so that asymmetric calibration's target
    (`bitsmith.algos.gptq.asymmetric_target`, the float model's outputs) is what it should fit: GPTQ's
    solve and AWQ's output-weighted scale and clipping searches (which then round that target) do;
    plain rounding to nearest, which sees no data, does not."""

    solve: Solver
    fits_outputs: bool = False


def _solve_rtn(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    scheme: Scheme,
    options: GPTQOptions,
    name: str,
    *,
    input_absmax: float | None = None,
) -> GPTQResult:
    """RTN under the common convention; errors are measured when a Hessian is given, NaN otherwise.
    `input_absmax` (calibration's largest |input|) makes the float8 grid's static activation scale."""
    quantized: Quantized
    if isinstance(scheme, GGMLScheme):
        importance = torch.diagonal(hessian) if hessian is not None and scheme.importance else None
        quantized = kquant.quantize(weight, scheme.type, importance, name=name)
    elif isinstance(scheme, FP8Scheme):
        quantized = quantize_fp8(weight, scheme, name=name, input_absmax=input_absmax)
    else:
        quantized = quantize_rtn(weight, scheme, name=name, search=options.grid_search)
    if hessian is None:
        row_errors = torch.full((weight.shape[0],), math.nan, dtype=torch.float64)
    else:
        row_errors = hessian_row_errors(weight.float() - quantized.dequantize(), hessian)
    error = float(row_errors.sum())
    return GPTQResult(
        weight=quantized,
        damp_percent=0.0,
        error=error,
        rtn_error=error,
        row_errors=row_errors,
        rtn_row_errors=row_errors,
    )


def _solve_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    scheme: Scheme,
    options: GPTQOptions,
    name: str,
    *,
    input_absmax: float | None = None,
) -> GPTQResult:
    if hessian is None:
        raise CalibrationError(f"{name}: GPTQ needs a Hessian from calibration data")
    return solve_gptq(weight, hessian, scheme, options, name=name, search=options.grid_search)


METHODS: Mapping[Method, MethodSpec] = {
    Method.RTN: MethodSpec(solve=_solve_rtn),
    Method.GPTQ: MethodSpec(solve=_solve_gptq, fits_outputs=True),
    Method.AWQ: MethodSpec(solve=_solve_rtn, fits_outputs=True),
    Method.AWQ_GPTQ: MethodSpec(solve=_solve_gptq, fits_outputs=True),
    Method.FP8: MethodSpec(solve=_solve_rtn),
}


def get_method(method: Method) -> MethodSpec:
    """The spec of `method`, or `UnsupportedError` listing the known methods."""
    try:
        return METHODS[Method(method)]
    except (KeyError, ValueError):
        raise UnsupportedError(f"method {method!r} is not supported; known: {[m.value for m in METHODS]}") from None


__all__ = [
    "METHODS",
    "GPTQResult",
    "MethodSpec",
    "Solver",
    "get_method",
    "quantize_rtn",
    "solve_gptq",
    "solve_gptq_reference",
    "split_rows",
]
