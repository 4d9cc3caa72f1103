"""Round to nearest: every group's grid fit to its own weights, every weight rounded on it."""

from __future__ import annotations

import torch

from bitsmith.algos.grid import fit_grid, group_size_for, quantize
from bitsmith.errors import SolverError
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import GridSearch, QuantScheme


def quantize_rtn(
    weight: torch.Tensor, scheme: QuantScheme, *, name: str = "", search: GridSearch | None = None
) -> QuantizedWeight:
    """Quantize `weight` [N, K] group by group with no calibration data (`search`: see `GridSearch`).

    >>> qw = quantize_rtn(torch.tensor([[0.0, 1.0, -1.0, 0.5]]), QuantScheme(bits=4, group_size=2))
    >>> qw.codes.tolist(), qw.zeros.tolist()
    ([[0, 15, 0, 15]], [[0, 10]])
    """
    if weight.dim() != 2:
        raise SolverError(f"{name}: weight must be 2-D, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise SolverError(f"{name}: weight contains NaN or Inf")
    n, k = weight.shape
    size = group_size_for(k, scheme, name)
    groups = weight.float().reshape(n * (k // size), size)
    scale, zero = fit_grid(groups, scheme, search)
    codes = quantize(groups, scale, zero, scheme.maxq).reshape(n, k)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(n, -1),
        zeros=zero.reshape(n, -1).to(torch.int32),
        g_idx=(torch.arange(k, device=weight.device) // size).to(torch.int32),
        scheme=scheme,
    )
