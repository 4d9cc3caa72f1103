"""Textbook GPTQ, one column at a time: the oracle `solve_gptq` is tested against.

No lazy batching: after each column is rounded, its scaled error is pushed onto every later column
at once. Slow (K full-width updates) and obviously faithful to the paper's Algorithm 1; it shares
the preparation and packaging with the fast solver so the two differ only in the column loop.
"""

from __future__ import annotations

import torch

from bitsmith.algos.gptq import GPTQResult, GridTracker, invert_upper_, prepare
from bitsmith.algos.grid import dequantize, quantize
from bitsmith.schemes import GPTQOptions, GridSearch, QuantScheme


def solve_gptq_reference(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    options: GPTQOptions,
    *,
    name: str = "",
    search: GridSearch | None = None,
) -> GPTQResult:
    """Same contract as `solve_gptq`; `options.block_size` is ignored."""
    prepared = prepare(weight, hessian, scheme, options, name, search)
    tracker = GridTracker(prepared, scheme)
    w = prepared.weight
    # U = R⁻¹, the upper Cholesky factor of H'⁻¹, in float64 and whole: the paper's factor.
    u = invert_upper_(prepared.factor.to(torch.float64, copy=True)).to(w.dtype)
    codes = torch.zeros_like(w)
    for column in range(w.shape[1]):
        scale, zero = tracker.grid(column, w[:, column : column + prepared.group_size])
        q = quantize(w[:, column : column + 1], scale, zero, scheme.maxq)
        codes[:, column] = q[:, 0]
        err = (w[:, column] - dequantize(q, scale, zero)[:, 0]) / u[column, column]
        w[:, column:] -= torch.outer(err, u[column, column:])
    return tracker.finish(codes, weight.to(w.dtype), hessian.to(device=w.device))
