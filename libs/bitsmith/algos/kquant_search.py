"""The searches inside llama.cpp's quantizers (ggml-quants.c), vectorized over independent groups.

Each function takes `x` [B, n]: B independent groups of n values (the weights of a sub-block, or the
sub-block scales of a super-block), and returns integer codes (float32, exact integers) with the
scale (and min) that go with them, as the C helper of the same role would for each group.

The aim is llama.cpp's output bit for bit, so arithmetic follows the C code's float32 operations in
their order: sums accumulate left to right (`seq_sum`, where `torch.sum` would reduce pairwise and
round differently, flipping near-tie decisions), products associate left to right, constants such
as ``0.1f*is`` are formed in float32, and `torch.round` (half to even) is exactly `nearest_int`
(which adds 1.5·2²³ and so rounds in the FPU's half-to-even mode). The C loops that stop early when
a pass changes nothing are run to their full count: a pass without changes leaves the state as it
was, so every later pass changes nothing too.

>>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
>>> codes, scale, the_min = affine_search(x, torch.ones_like(x), 3, -0.5, 0.1, 15, use_mad=False)
>>> codes.tolist(), scale.tolist(), the_min.tolist()
([[0.0, 1.0, 2.0, 3.0]], [1.0], [-0.0])
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))
"""Below this absolute maximum a group counts as all zero (ggml-quants.c's GROUP_MAX_EPS)."""


def div(num: torch.Tensor | float, den: torch.Tensor | float) -> torch.Tensor:
    """`num / den` rounded once, as C divides: torch computes ``c / t`` as c·(1/t) and, on CUDA,
    ``t / c`` as t·(1/c), rounding twice, so a number operand is made a full tensor first."""
    if isinstance(num, torch.Tensor) and isinstance(den, torch.Tensor):
        return num / den
    if isinstance(num, torch.Tensor):
        return num / torch.full_like(num, float(den))
    if isinstance(den, torch.Tensor):
        return torch.full_like(den, float(num)) / den
    raise TypeError("div needs a tensor operand")


def sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as C's `sqrtf`: torch's vectorized CPU float32 sqrt
    may be off by an ulp; the float64 root of a float32 rounds back to the exact float32 one."""
    return torch.sqrt(t.double()).to(t.dtype)


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension left to right in `t`'s dtype, as a C loop ``acc += t[i]`` does."""
    columns = t.movedim(-1, 0).contiguous()
    acc = columns[0].clone()
    for column in columns[1:]:
        acc += column
    return acc


def abs_max_signed(x: torch.Tensor) -> torch.Tensor:
    """Per row, the value of largest magnitude with its sign (the first one on ties, like the C scan)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's `roundf`: to nearest, halves away from zero (`v - trunc(v)` is exact, so no double rounding)."""
    t = v.trunc()
    return t + torch.where((v - t).abs() >= 0.5, v.sign(), torch.zeros_like(v))


def _weighted_error(diff: torch.Tensor, weights: torch.Tensor, use_mad: bool) -> torch.Tensor:
    return seq_sum(weights * (diff.abs() if use_mad else diff * diff))


def affine_search(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    *,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes in [0, nmax], scale, the_min) with x ≈ scale·code - the_min: `make_qkx2_quants` /
    `make_qkx3_quants` (identical when weights are given).

    Starts from the min..max grid, then tries nstep + 1 stretched grids (nmax + rmin + i·rdelta steps
    over the range) and, for each, the weighted least-squares scale and min of its codes (the min
    capped at 0); the trial with the least weighted error wins and re-anchors the later trials.
    """
    xmin = x.amin(-1)
    xmin = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    xmax = x.amax(-1)
    degenerate = xmax <= xmin
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    iscale = div(nmax, xmax - xmin)
    scale = div(1, iscale)
    codes = (iscale[:, None] * (x - xmin[:, None])).round().clamp(0, nmax)
    best = _weighted_error(scale[:, None] * codes + xmin[:, None] - x, weights, use_mad)
    for step in range(nstep + 1):
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        trial = (div(factor, xmax - xmin)[:, None] * (x - xmin[:, None])).round().clamp(0, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = seq_sum(torch.stack((wl, wl * trial, wl * x)))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        capped = this_min > 0
        this_scale = torch.where(capped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(capped, torch.zeros_like(this_min), this_min)
        error = _weighted_error(this_scale[:, None] * trial + this_min[:, None] - x, weights, use_mad)
        better = (det > 0) & (error < best)
        codes = torch.where(better[:, None], trial, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        xmin = torch.where(better, this_min, xmin)
    codes = torch.where(degenerate[:, None], torch.zeros_like(codes), codes)
    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    return codes, scale, -xmin


def _signed_sums(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·x·l, Σ w·l·l) left to right, the statistics of the least-squares scale Σwxl / Σwll."""
    sumlx, suml2 = seq_sum(torch.stack((w * x * levels, w * levels * levels)))
    return sumlx, suml2


def symmetric_search(
    x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, 2·nmax), scale) with x ≈ scale·(code - nmax): `make_qx_quants` with rmse_type 1.

    The grid is anchored on the value of largest magnitude (mapped to -nmax), its 18 neighbours
    nmax ± 0.1·i are tried, and each is scored by its weighted least-squares fit; `weights` default
    to x² as in llama.cpp. All-zero groups get codes 0 and scale 0.
    """
    vmax = abs_max_signed(x)
    zero = x.abs().amax(-1) < GROUP_MAX_EPS
    w = x * x if weights is None else weights

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return (iscale[:, None] * x).round().clamp(-nmax, nmax - 1)

    best_levels = levels(div(-nmax, vmax))
    sumlx, suml2 = _signed_sums(x, w, best_levels)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        factor = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        trial = levels(div(factor, vmax))
        sumlx, suml2 = _signed_sums(x, w, trial)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_levels = torch.where(better[:, None], trial, best_levels)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    codes = torch.where(zero[:, None], torch.zeros_like(best_levels), best_levels + nmax)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def _coordinate_descent(
    x: torch.Tensor,
    w: torch.Tensor,
    levels: torch.Tensor,
    low: float,
    high: float,
    *,
    guard_others: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five passes of llama.cpp's one-level-at-a-time refinement of (Σwxl)² / Σwll (the least-squares
    fit quality): each level moves to round(x·Σ'wll / Σ'wxl) of the others' fit when that improves it.

    The C helpers guard the division differently: make_qp_quants (`guard_others`) needs the others'
    Σ'wll > 0, make_q3_quants the new Σwll > 0. Returns the levels and the final (Σwxl, Σwll).
    """
    levels = levels.clone()
    wx = w * x
    sumlx, suml2 = _signed_sums(x, w, levels)
    for _ in range(5):
        for i in range(x.shape[1]):
            li = levels[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            new = (x[:, i] * sl2 / slx).round().clamp(low, high)
            new_slx = slx + wx[:, i] * new
            new_sl2 = sl2 + w[:, i] * new * new
            accept = (slx > 0) & (new != li) & ((sl2 if guard_others else new_sl2) > 0)
            accept &= new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2
            levels[:, i] = torch.where(accept, new, li)
            sumlx = torch.where(accept, new_slx, sumlx)
            suml2 = torch.where(accept, new_sl2, suml2)
    return levels, sumlx, suml2


def q3_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, 2·nmax), scale) with x ≈ scale·(code - nmax): `make_q3_quants` with do_rmse,
    Q3_K's sub-block search without an importance matrix (x² weights, coordinate descent)."""
    vmax = abs_max_signed(x)
    zero = x.abs().amax(-1) < GROUP_MAX_EPS
    start = (div(-nmax, vmax)[:, None] * x).round().clamp(-nmax, nmax - 1)
    levels, sumlx, suml2 = _coordinate_descent(
        x, x * x, start, -nmax, nmax - 1, guard_others=False
    )
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero[:, None], torch.zeros_like(levels), levels + nmax)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def scale_search(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, nmax], scale) with x ≈ scale·code for non-negative x: `make_qp_quants`, how the
    importance-matrix path quantizes a super-block's sub-block scales and mins.

    Tries nmax ± 0.1·i steps over the maximum by weighted squared error, then refines by coordinate
    descent. llama.cpp keeps these codes in uint8, so a negative x (never produced by the sub-block
    searches) would wrap there; here codes are clamped at 0 instead.
    """
    xmax = x.amax(-1)
    xmax = torch.where(xmax > 0, xmax, torch.zeros_like(xmax))
    zero = xmax < GROUP_MAX_EPS

    def mse(levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        diff = x - scale[:, None] * levels
        return seq_sum(weights * diff * diff)

    iscale = div(nmax, xmax)
    best = mse((iscale[:, None] * x).round(), div(1, iscale))
    for step in (*range(-4, 0), *range(1, 5)):
        factor = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        trial_iscale = div(factor, xmax)
        error = mse((trial_iscale[:, None] * x).round().clamp(max=nmax), div(1, trial_iscale))
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, trial_iscale, iscale)
    start = (iscale[:, None] * x).round().clamp(max=nmax)
    levels, sumlx, suml2 = _coordinate_descent(
        x, weights, start, -float("inf"), nmax, guard_others=True
    )
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero[:, None], torch.zeros_like(levels), levels.clamp(min=0))
    return codes, torch.where(zero, torch.zeros_like(scale), scale)
