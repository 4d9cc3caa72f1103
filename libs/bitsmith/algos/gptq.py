"""GPTQ (Frantar et al., 2022): quantize columns in order, pushing each column's rounding error onto
the columns not yet quantized through the Cholesky factor of the inverse Hessian.

`solve_gptq` is the production solver: "lazy batch" blocks of columns, where each column's update
touches only its block and the rest of the matrix is updated once per block by one matrix product.
It is exactly the column-by-column algorithm (`gptq_reference.py`, the test oracle) reordered, so
both share the preparation (dead inputs, act-order permutation, damping, factorization) and the
packaging of the result defined here.

Every row is solved independently against the same factor, so the rows of linears that share an
input (q/k/v) may be concatenated and solved with one factorization; `split_rows` cuts the result
back. Computation runs on the tensors' device, in float64 when the weight is float64 (tests) and
float32 otherwise; the factorization is always float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitsmith.algos.grid import fit_grid, group_size_for
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.errors import ConfigError, SolverError
from bitsmith.kernels import KernelPreference
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import GPTQOptions, GridSearch, QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTQResult:
    """A solved linear and how well it was solved.

    `error` is tr(ΔW·H·ΔWᵀ), the calibration output error GPTQ minimises, and `rtn_error` the same
    for round-to-nearest on the same scheme, so error / rtn_error < 1 says GPTQ earned its keep.
    The per-row terms (float64 [N]) let a result of concatenated linears be split exactly.
    """

    weight: QuantizedWeight
    damp_percent: float
    error: float
    rtn_error: float
    row_errors: torch.Tensor
    rtn_row_errors: torch.Tensor


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A problem ready for the column loop, in processing (possibly permuted) column order.

    `static_grids` holds (scale, zero) [N, G] per original-order group when `static_groups` is on;
    `search` is the optional range search every grid fit uses.
    """

    weight: torch.Tensor
    chol: torch.Tensor
    perm: torch.Tensor | None
    damp_percent: float
    group_size: int
    static_grids: tuple[torch.Tensor, torch.Tensor] | None
    search: GridSearch | None = None


def hessian_row_errors(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N]."""
    delta = delta.double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def inverse_hessian_factor(hessian: torch.Tensor, options: GPTQOptions, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ and the damping λ (percent/100) used.

    λ starts at `options.damp_percent` and grows x10 (capped at `max_damp_percent`) while the
    factorization fails; past the cap the layer is unsolvable and `SolverError` names it.

    With J the order reversal, the lower Cholesky factor M of J·H·J gives H = R·Rᵀ for the upper
    R = J·M·J, so H⁻¹ = (R⁻¹)ᵀ·R⁻¹ and U = R⁻¹ is the factor wanted: one factorization and one
    triangular inverse instead of factorize, invert (potri) and factorize again, half the time on
    an H100 at K = 28672 (0.72 s against 1.51 s in float64).
    """
    h = hessian.double()
    mean_diag = torch.diagonal(h).mean()
    damp = options.damp_percent
    while True:
        # In place on a copy, and each intermediate dropped once used: at K = 28672 every KxK
        # float64 matrix is 6.6 GB, and the peak is what decides whether a layer fits the GPU.
        damped = h.flip(0, 1)
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            r = lower.flip(0, 1)
            del lower
            identity = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
            upper = torch.linalg.solve_triangular(r, identity, upper=True)
            del r, identity
            if torch.isfinite(upper).all():
                return upper, damp
        if damp >= options.max_damp_percent:
            raise SolverError(
                f"{name}: Hessian is not positive definite even with damping {damp:g} "
                f"(max_damp_percent); the calibration data may be degenerate for this layer"
            )
        damp = min(damp * 10, options.max_damp_percent)


def prepare(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    options: GPTQOptions,
    name: str = "",
    search: GridSearch | None = None,
) -> Prepared:
    """Validate, zero dead inputs, fix static grids, permute for act-order and factorize."""
    if weight.dim() != 2:
        raise ConfigError(f"{name}: weight must be 2-D, got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ConfigError(f"{name}: Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    if not torch.isfinite(weight).all():
        raise SolverError(f"{name}: weight contains NaN or Inf")
    if not torch.isfinite(hessian).all():
        raise SolverError(f"{name}: Hessian contains NaN or Inf")
    size = group_size_for(k, scheme, name)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static_grids = None
    if options.static_groups and size < k:
        grids = [fit_grid(w[:, start : start + size], scheme, search) for start in range(0, k, size)]
        static_grids = (torch.stack([g[0] for g in grids], 1), torch.stack([g[1] for g in grids], 1))
    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    chol, damp = inverse_hessian_factor(h, options, name)
    return Prepared(
        weight=w,
        chol=chol.to(dtype),
        perm=perm,
        damp_percent=damp,
        group_size=size,
        static_grids=static_grids,
        search=search,
    )


class GridTracker:
    """The grid each processed column is rounded on, fit lazily at group starts.

    Without static groups a group is `group_size` consecutive columns in processing order and its
    grid is fit, when its first column comes up, to the group's weights as updated so far.
    """

    def __init__(self, prepared: Prepared, scheme: QuantScheme) -> None:
        self._prepared = prepared
        self._scheme = scheme
        self._fitted: list[tuple[torch.Tensor, torch.Tensor]] = []
        k, device = prepared.weight.shape[1], prepared.weight.device
        original = prepared.perm if prepared.perm is not None else torch.arange(k, device=device)
        self._static_sel = (original // prepared.group_size).to(torch.int32)

    def runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Cut block [start, stop) into runs whose grids are known at the run's first column.

        A dynamic group's grid is fit to the weights as updated up to its first column, so a run
        ends before every group start; static grids are all known, so the block is one run.
        """
        p = self._prepared
        if p.static_grids is not None:
            return [(start, stop)]
        bounds = [start, *(c for c in range(start + 1, stop) if c % p.group_size == 0), stop]
        return list(itertools.pairwise(bounds))

    def run_grids(
        self, begin: int, end: int, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scales, zeros [N, S], sel int32 [end - begin]): column begin + j is rounded on grid sel[j].

        `current` is W[:, begin:begin+group] as `grid` wants it.
        """
        p = self._prepared
        if p.static_grids is not None:
            return p.static_grids[0], p.static_grids[1], self._static_sel[begin:end]
        scale, zero = self.grid(begin, current)
        return scale.unsqueeze(1), zero.unsqueeze(1), self._static_sel.new_zeros(end - begin)

    def grid(self, column: int, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [N] for processing-order `column`; `current` is W[:, column:column+group]."""
        p = self._prepared
        if p.static_grids is not None:
            original = int(p.perm[column]) if p.perm is not None else column
            group = original // p.group_size
            return p.static_grids[0][:, group], p.static_grids[1][:, group]
        if column % p.group_size == 0:
            self._fitted.append(fit_grid(current, self._scheme, p.search))
        return self._fitted[-1]

    def finish(self, codes: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> GPTQResult:
        """Package processing-order codes [N, K] in original column order with their grids and errors."""
        p, scheme = self._prepared, self._scheme
        k = codes.shape[1]
        group_of = torch.arange(k, device=codes.device) // p.group_size
        if p.static_grids is not None:
            scales, zeros = p.static_grids
            g_idx = group_of
        else:
            scales = torch.stack([g[0] for g in self._fitted], 1)
            zeros = torch.stack([g[1] for g in self._fitted], 1)
            g_idx = group_of if p.perm is None else torch.empty_like(group_of).scatter_(0, p.perm, group_of)
        if p.perm is not None:
            codes = torch.empty_like(codes).scatter_(1, p.perm.expand_as(codes), codes)
        quantized = QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=scales.float(),
            zeros=zeros.to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            scheme=scheme,
        )
        row_errors = hessian_row_errors(weight - quantized.dequantize(weight.dtype), hessian)
        rtn = quantize_rtn(weight, scheme, search=p.search)
        rtn_row_errors = hessian_row_errors(weight - rtn.dequantize(weight.dtype), hessian)
        return GPTQResult(
            weight=quantized,
            damp_percent=p.damp_percent,
            error=float(row_errors.sum()),
            rtn_error=float(rtn_row_errors.sum()),
            row_errors=row_errors,
            rtn_row_errors=rtn_row_errors,
        )


def _block_width(requested: int, group_size: int, columns: int) -> int:
    """A block width near `requested` such that no group straddles a block boundary.

    A group's grid is fit when its first column comes up, to weights that must already carry every
    earlier column's update; the lazy update reaches columns past the current block only at the
    block's end, so each group must start a block or lie inside one.
    """
    if group_size >= columns:
        return requested
    if group_size <= requested:
        return requested - requested % group_size
    return max(d for d in range(1, requested + 1) if group_size % d == 0)


def solve_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    options: GPTQOptions,
    *,
    name: str = "",
    search: GridSearch | None = None,
    kernels: KernelPreference = KernelPreference.AUTO,
) -> GPTQResult:
    """Quantize `weight` [N, K] minimising tr(ΔW·H·ΔWᵀ) for the input Hessian `hessian` [K, K].

    `search` makes every group's grid the best shrunk range (`GridSearch`) rather than min..max.
    The in-block column loop runs as one Triton launch per run of columns on CUDA float32 and as
    the torch twin elsewhere (`bitsmith.kernels.select`); `kernels` overrides that choice.

    >>> w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    >>> result = solve_gptq(w, 2 * x.T @ x / 256, QuantScheme(bits=3, group_size=32), GPTQOptions())
    >>> result.weight.codes.shape, result.error < result.rtn_error
    (torch.Size([8, 64]), True)
    """
    # Imported here: the kernels' twin builds on `bitsmith.algos.grid`, so a module-level import
    # would make `bitsmith.algos` and `bitsmith.kernels.select` import each other.
    from bitsmith.kernels.gptq_block import BlockSpec
    from bitsmith.kernels.select import choose_block_solver

    prepared = prepare(weight, hessian, scheme, options, name, search)
    tracker = GridTracker(prepared, scheme)
    w, u = prepared.weight, prepared.chol
    k, size = w.shape[1], prepared.group_size
    codes = torch.zeros_like(w)
    width = _block_width(options.block_size, size, k)
    solve_block = choose_block_solver(BlockSpec.of(w, width), kernels).solve
    for start in range(0, k, width):
        stop = min(start + width, k)
        # The block is a view: its columns are never read again once solved, so update them in place.
        block = w[:, start:stop]
        errors = torch.zeros_like(block, memory_format=torch.contiguous_format)
        u_block = u[start:stop, start:stop].contiguous()
        for begin, end in tracker.runs(start, stop):
            # At a block's first column the full matrix is current; inside it, only `block` is.
            current = w[:, begin : begin + size] if begin == start else block[:, begin - start : begin - start + size]
            scales, zeros, sel = tracker.run_grids(begin, end, current)
            solve_block(block, u_block, scales, zeros, sel, codes[:, start:stop], errors, begin - start, end - start,
                        scheme.maxq)
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return tracker.finish(codes, weight.to(w.dtype), hessian.to(device=w.device))


def split_rows(result: GPTQResult, sizes: Sequence[int]) -> list[GPTQResult]:
    """Cut a result solved on concatenated rows back into one result per linear, exactly."""
    if sum(sizes) != result.weight.shape[0]:
        raise ConfigError(f"row sizes {list(sizes)} do not add up to {result.weight.shape[0]} rows")
    parts = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        qw = result.weight
        parts.append(
            GPTQResult(
                weight=QuantizedWeight(
                    codes=qw.codes[rows],
                    scales=qw.scales[rows],
                    zeros=qw.zeros[rows],
                    g_idx=qw.g_idx,
                    scheme=qw.scheme,
                ),
                damp_percent=result.damp_percent,
                error=float(result.row_errors[rows].sum()),
                rtn_error=float(result.rtn_row_errors[rows].sum()),
                row_errors=result.row_errors[rows],
                rtn_row_errors=result.rtn_row_errors[rows],
            )
        )
        start += size
    return parts
