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
from bitsmith.quantized import GGMLWeight, QuantizedWeight
from bitsmith.schemes import GGMLScheme, GPTQOptions, GridSearch, QuantScheme, Scheme


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTQResult:
    """A solved linear and how well it was solved.

    `error` is tr(ΔW·H·ΔWᵀ), the calibration output error GPTQ minimises, and `rtn_error` the same
    for round-to-nearest on the same scheme, so error / rtn_error < 1 says GPTQ earned its keep.
    The per-row terms (float64 [N]) let a result of concatenated linears be split exactly.
    """

    weight: QuantizedWeight | GGMLWeight
    damp_percent: float
    error: float
    rtn_error: float
    row_errors: torch.Tensor
    rtn_row_errors: torch.Tensor


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A problem ready for the column loop, in processing (possibly permuted) column order.

    `static_grids` holds (scale, zero) [N, G] per original-order group when `static_groups` is on;
    `search` is the optional range search every grid fit uses. `dead` marks the inputs (original
    order) whose Hessian diagonal is zero, and `damping` is λ·m, what the factorized H' added to the
    diagonal (m = mean diag H after dead inputs got a unit diagonal): the error identities need both.
    """

    weight: torch.Tensor
    chol: torch.Tensor
    perm: torch.Tensor | None
    damp_percent: float
    damping: float
    dead: torch.Tensor
    group_size: int
    static_grids: tuple[torch.Tensor, torch.Tensor] | None
    search: GridSearch | None = None


def hessian_row_errors(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N]."""
    delta = delta.double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


ROW_SQUARES_CHUNK = 2**27
"""Elements (1 GiB in float64) per chunk of rows that `row_squares` widens at a time."""


def row_squares(x: torch.Tensor, chunk: int = ROW_SQUARES_CHUNK) -> torch.Tensor:
    """Σ_j x[i, j]² per row, float64 [N], widened to float64 a chunk of rows at a time.

    The squares of float32 values are exact in float64, so only the sums round; widening the whole
    matrix at once would hold float64 copies of it (7.5 GB for the stacked 57344x8192 gate/up), and
    such copies set the solve's peak memory.
    """
    rows = max(1, chunk // max(1, x.shape[1]))
    return torch.cat([x[i : i + rows].to(torch.float64, copy=True).square_().sum(dim=1)
                      for i in range(0, x.shape[0], rows)])


def factor_row_errors(delta: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N], of `delta` [N, K] (original column order) through the
    factor U that `prepared` was solved with rather than through H; `delta`'s dead columns are zeroed
    in place (they contribute nothing: H has a zero row and column there).

    U is the upper Cholesky factor of H'⁻¹ for the damped H' = H + λ·m·I (dead inputs given a unit
    diagonal), so H' = U⁻¹·U⁻ᵀ and ΔW·H·ΔWᵀ = ‖ΔW·U⁻¹‖² - λ·m·‖ΔW‖² row by row: one triangular solve
    in U's precision, N·K² multiply-adds, in place of the float64 product with H, 2·N·K² at the same
    rate on an H100 (float32 arithmetic is no faster than float64 there; TF32 products were off by
    2e-4 to 2e-3). The solve's terms are squares, which cannot cancel: with a float32 U the totals
    were within 6e-7 of the float64 product's, single rows within 1.3e-5.
    """
    delta.masked_fill_(prepared.dead, 0.0)
    damping = prepared.damping * row_squares(delta)
    if prepared.perm is not None:
        delta = delta[:, prepared.perm]
    scaled = torch.linalg.solve_triangular(prepared.chol, delta.to(prepared.chol.dtype), upper=True, left=False)
    return row_squares(scaled) - damping


def loop_row_errors(scaled_squares: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor,
                    prepared: Prepared) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N], of a GPTQ solve from its column loop's own errors.

    The loop's scaled errors E (processing order) rebuild its change of the prepared weight exactly:
    ΔW' = E·U, so ΔW'·H'·ΔW'ᵀ = E·U·H'·Uᵀ·Eᵀ = ‖E‖² per row, and `scaled_squares` (Σ E², float64
    [N], summed block by block) is that at no extra cost, where `factor_row_errors` needs a triangular
    solve. What H' adds to H is taken off: λ·m·‖ΔW'‖², and ΔW'² once more on dead inputs, whose unit
    diagonal H lacks. ΔW' is `weight` - `dequantized` ([N, K], original order) but on dead inputs,
    zeroed in the prepared weight, where it is -`dequantized` and ΔW is not counted (H is zero there).
    """
    delta = (weight - dequantized).masked_fill_(prepared.dead, 0.0)
    at_dead = dequantized[:, prepared.dead]
    return scaled_squares - prepared.damping * row_squares(delta) - (1 + prepared.damping) * row_squares(at_dead)


def row_errors(delta: torch.Tensor, prepared: Prepared, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N]: through the factor on CUDA (`factor_row_errors`, which
    overwrites `delta`), elsewhere from the product with H, exact in float64."""
    return factor_row_errors(delta, prepared) if delta.is_cuda else hessian_row_errors(delta, hessian)


TRIANGULAR_LEAF = 1024
"""Order up to which `invert_upper_` solves against the identity: below it the solves are too small
to keep the GPU busy, and the recursion's extra launches would cost more than the arithmetic saved."""

TRIANGULAR_PRODUCT_ORDER = 8192
"""Order up to which `invert_upper_` forms the corner from the inverted halves by two matrix products:
twice the arithmetic of the two triangular solves, but at ~1.7x their rate on an H100, a net win up
to here (K = 8192: 11 ms against 15) and a loss above (K = 28672: 0.30 s by products alone, 0.25 s by
solves alone, 0.23 s split at this order)."""


def invert_upper_(
    r: torch.Tensor, leaf: int = TRIANGULAR_LEAF, product_order: int = TRIANGULAR_PRODUCT_ORDER
) -> torch.Tensor:
    """Invert the non-singular upper-triangular `r` [K, K] in place and return it.

    [[A, B], [0, C]]⁻¹ = [[A⁻¹, -A⁻¹·B·C⁻¹], [0, C⁻¹]] with A⁻¹ and C⁻¹ inverted in place recursively.
    Large corners are two triangular solves against A and C before those are inverted, so the whole
    costs about K³/3 multiply-adds like LAPACK's trtri, against K³ for `solve_triangular(r, I)` (on an
    H100 at K = 28672: 0.23 s against 0.53 s), and holds (K/2)² temporaries instead of two more KxK
    matrices (6.6 GB each in float64 at K = 28672).
    """
    k = r.shape[0]
    if k <= leaf:
        identity = torch.eye(k, dtype=r.dtype, device=r.device)
        return r.copy_(torch.linalg.solve_triangular(r, identity, upper=True))
    half = k // 2
    a, b, c = r[:half, :half], r[:half, half:], r[half:, half:]
    if k > product_order:
        corner = torch.linalg.solve_triangular(a, b, upper=True)
        corner = torch.linalg.solve_triangular(c, corner, upper=True, left=False)
        b.copy_(corner.neg_())
        del corner
        invert_upper_(a, leaf, product_order)
        invert_upper_(c, leaf, product_order)
    else:
        invert_upper_(a, leaf, product_order)
        invert_upper_(c, leaf, product_order)
        b.copy_(a @ b @ c).neg_()
    return r


def inverse_hessian_factor(hessian: torch.Tensor, options: GPTQOptions, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ and the damping λ (percent/100) used.

    λ starts at `options.damp_percent` and grows x10 (capped at `max_damp_percent`) while the
    factorization fails; past the cap the layer is unsolvable and `SolverError` names it.

    With J the order reversal, the lower Cholesky factor M of J·H·J gives H = R·Rᵀ for the upper
    R = J·M·J, so H⁻¹ = (R⁻¹)ᵀ·R⁻¹ and U = R⁻¹ is the factor wanted: one factorization and one
    triangular inverse instead of factorize, invert (potri) and factorize again, half the time on
    an H100 at K = 28672 (0.72 s against 1.51 s in float64). The inverse is taken in place by
    `invert_upper_`, a third of the arithmetic of solving against the identity.
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
            upper = invert_upper_(lower.flip(0, 1))
            del lower
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
    scheme: Scheme,
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
    if isinstance(scheme, QuantScheme):
        size = group_size_for(k, scheme, name)
    else:
        size = _ggml_group_size(k, scheme, options, name)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static_grids = None
    if options.static_groups and size < k and isinstance(scheme, QuantScheme):
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
        damping=damp * float(torch.diagonal(h).mean()),
        dead=dead,
        group_size=size,
        static_grids=static_grids,
        search=search,
    )


def _ggml_group_size(in_features: int, scheme: GGMLScheme, options: GPTQOptions, name: str) -> int:
    """A ggml block is a group; `ConfigError` naming the layer when blocks do not tile its rows, or for
    act-order / static groups, whose column order a ggml row (no g_idx) cannot record."""
    label = name or "weight"
    if options.act_order or options.static_groups:
        raise ConfigError(f"{label}: act_order and static_groups reorder columns, which {scheme.type.value} "
                          f"blocks cannot record (ggml has no g_idx); turn both off for GGUF targets")
    try:
        scheme.groups(in_features)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return scheme.type.block_size


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

    @property
    def maxq(self) -> int:
        """The largest integer code."""
        return self._scheme.maxq

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

    def reference_row_errors(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest's per-row errors (`row_errors`) on the same scheme and range search, the
        baseline `GPTQResult.rtn_error` reports."""
        p = self._prepared
        rtn = quantize_rtn(weight, self._scheme, search=p.search)
        return row_errors(weight - rtn.dequantize(weight.dtype), p, hessian)

    def finish(
        self,
        codes: torch.Tensor,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        scaled_squares: torch.Tensor | None = None,
    ) -> GPTQResult:
        """Package processing-order codes [N, K] in original column order with their grids and errors
        (`solved_result`)."""
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
        return solved_result(quantized, weight, hessian, p, scaled_squares, self.reference_row_errors(weight, hessian))


def solved_result(
    quantized: QuantizedWeight | GGMLWeight,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    prepared: Prepared,
    scaled_squares: torch.Tensor | None,
    rtn_row_errors: torch.Tensor,
) -> GPTQResult:
    """`quantized` (solved from `weight` [N, K]) as a result, with GPTQ's per-row errors from the
    column loop's `scaled_squares` where given (`loop_row_errors`: `solve_gptq` on CUDA) and from
    `row_errors` otherwise (the oracle, and CPU solves, exact through H)."""
    dequantized = quantized.dequantize(weight.dtype)
    if scaled_squares is None:
        rows = row_errors(weight - dequantized, prepared, hessian)
    else:
        rows = loop_row_errors(scaled_squares, weight, dequantized, prepared)
    return GPTQResult(
        weight=quantized,
        damp_percent=prepared.damp_percent,
        error=float(rows.sum()),
        rtn_error=float(rtn_row_errors.sum()),
        row_errors=rows,
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
    scheme: Scheme,
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
    A `GGMLScheme` solves on that ggml type's block grids (`bitsmith.algos.kquant_gptq`), whose own
    block search takes the place of `search`.

    >>> w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    >>> result = solve_gptq(w, 2 * x.T @ x / 256, QuantScheme(bits=3, group_size=32), GPTQOptions())
    >>> result.weight.codes.shape, result.error < result.rtn_error
    (torch.Size([8, 64]), True)
    """
    # Imported here: the kernels' twin builds on `bitsmith.algos.grid`, so a module-level import
    # would make `bitsmith.algos` and `bitsmith.kernels.select` import each other (and the ggml
    # tracker builds on this module).
    from bitsmith.algos.kquant_gptq import GGMLTracker
    from bitsmith.kernels.gptq_block import BlockSpec
    from bitsmith.kernels.select import choose_block_solver

    prepared = prepare(weight, hessian, scheme, options, name, search)
    tracker: GridTracker | GGMLTracker = (
        GridTracker(prepared, scheme) if isinstance(scheme, QuantScheme) else GGMLTracker(prepared, scheme, hessian)
    )
    w, u = prepared.weight, prepared.chol
    k, size = w.shape[1], prepared.group_size
    codes = torch.zeros_like(w)
    # ‖E‖² per row, for GPTQ's error without a product (`loop_row_errors`); CPU solves use H exactly.
    squares = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if w.is_cuda else None
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
                        tracker.maxq)
        # In place: `w[:, stop:] -= errors @ u` would write and read back an N x (K - stop) product
        # (down_proj: 0.10 s of 0.98 on an H100, same codes).
        w[:, stop:].addmm_(errors, u[start:stop, stop:], alpha=-1)
        if squares is not None:
            squares += row_squares(errors)
    return tracker.finish(codes, weight.to(w.dtype), hessian.to(device=w.device), squares)


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
                weight=qw.rows(rows) if isinstance(qw, GGMLWeight) else QuantizedWeight(
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
