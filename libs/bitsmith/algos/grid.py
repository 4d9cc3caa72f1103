"""The integer grid: fitting (scale, zero) to a slice of weights, and rounding onto it.

The fit is the GPTQ convention (FORMATS.md §1.3), which the reference model's RTN numbers also use:
asymmetric grids span [min(w, 0), max(w, 0)] so zero is always representable; symmetric grids put the
zero at 2^(bits-1); an all-zero slice gets the range [-1, 1]. `scheme.min_zero` raises the lowest
zero an asymmetric grid may use (GPTQ v1 files cannot store a zero of 0); when the natural zero is
below it, the scale grows just enough that the grid still covers the slice with that zero.

`GridSearch` is the demanding user's knob: instead of the full min..max range, try ranges shrunk
by 1, 0.99, ... and keep, per row, the one whose rounding error sum |q(w) - w|^norm is smallest
(GPTQ's "mse" option). Clipping a few outliers buys a finer step for everything else; on the demo
Llama it cuts GPTQ's perplexity cost by about a third at 3 and 4 bits.
"""

from __future__ import annotations

import torch

from bitsmith.errors import ConfigError
from bitsmith.schemes import GridSearch, QuantScheme


def fit_grid(
    weight: torch.Tensor, scheme: QuantScheme, search: GridSearch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `weight` [R, C], each float32 [R]; zero holds integral values.

    Without `search` the grid spans the row's whole range; with it, the best shrunk range.

    >>> fit_grid(torch.tensor([[-1.0, 2.0]]), QuantScheme(bits=2, sym=False))
    (tensor([1.]), tensor([1.]))
    """
    weight = weight.float()
    if search is None:
        return _fit_range(weight, scheme)
    best_scale, best_zero = _fit_range(weight, scheme)
    best_error = torch.full_like(best_scale, float("inf"))
    for factor in search.factors:
        scale, zero = _fit_range(weight * factor, scheme)
        rounded = dequantize(quantize(weight, scale, zero, scheme.maxq), scale, zero)
        error = (rounded - weight).abs().pow(search.norm).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _fit_range(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid spanning each row's [min(w, 0), max(w, 0)] (FORMATS.md §1.3, min_zero honoured)."""
    maxq = scheme.maxq
    xmin = weight.min(dim=1).values.clamp(max=0)
    xmax = weight.max(dim=1).values.clamp(min=0)
    if scheme.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if scheme.sym:
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    zero = torch.round(-xmin / scale)
    if scheme.min_zero:
        low = zero < scheme.min_zero
        refit = torch.maximum(xmax / (maxq - scheme.min_zero), -xmin / scheme.min_zero)
        scale = torch.where(low, refit, scale)
        zero = torch.where(low, float(scheme.min_zero), zero)
    return scale, zero


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor) of `weight` [R, C] on per-row grids `scale`, `zero` [R]."""
    return torch.clamp(torch.round(weight / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The values codes [R, C] stand for on per-row grids `scale`, `zero` [R]."""
    return scale.unsqueeze(1) * (codes - zero.unsqueeze(1))


def group_size_for(in_features: int, scheme: QuantScheme, name: str = "") -> int:
    """Columns per group for a layer, or `ConfigError` naming the layer when the size does not divide."""
    try:
        scheme.groups(in_features)
    except ConfigError as exc:
        raise ConfigError(f"{name or 'weight'}: {exc}") from None
    return scheme.effective_group_size(in_features)
