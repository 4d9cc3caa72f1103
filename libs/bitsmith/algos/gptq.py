"""GPTQ (Frantar et al., 2022): quantize columns in order, pushing each column's rounding error onto
the columns not yet quantized through the Cholesky factor of the inverse Hessian.

`solve_gptq` is the production solver: "lazy batch" blocks of columns, where each column's update
touches only its block and the rest of the matrix is updated once per block by one matrix product.
It is exactly the column-by-column algorithm (`gptq_reference.py`, the test oracle) reordered, so
both share the preparation (dead inputs, act-order permutation, damping, factorization) and the
packaging of the result defined here.

Every row is solved independently against the same factor, so the rows of linears that share an
input (q/k/v) may be concatenated and solved with one factorization; `split_rows` cuts the result
back, and `solve_gptq(devices=...)` solves shards of rows on several devices at once. Computation
runs on the tensors' device, in float64 when the weight is float64 (tests) and float32 otherwise; the
factorization is always float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from bitsmith.algos.grid import fit_grid, group_size_for
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.errors import ConfigError, SolverError, UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.quantized import FP8Weight, GGMLWeight, Quantized, QuantizedWeight
from bitsmith.schemes import FP8Scheme, GGMLScheme, GPTQOptions, GridSearch, QuantScheme, Scheme

SolvedGrid = QuantScheme | GGMLScheme
"""The grids GPTQ solves on (the float8 grid is rounded to nearest: `bitsmith.algos.fp8`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTQResult:
    """A solved linear and how well it was solved.

    `error` is tr(ΔW·H·ΔWᵀ), the calibration output error GPTQ minimises, and `rtn_error` the same
    for round-to-nearest on the same scheme, so error / rtn_error < 1 says GPTQ earned its keep.
    The per-row terms (float64 [N]) let a result of concatenated linears be split exactly.
    """

    weight: Quantized
    damp_percent: float
    error: float
    rtn_error: float
    row_errors: torch.Tensor
    rtn_row_errors: torch.Tensor


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A problem ready for the column loop, in processing (possibly permuted) column order.

    `factor` is R, the upper-triangular Cholesky factor of the damped Hessian H' = R·Rᵀ (processing
    order), so U = R⁻¹ is the upper Cholesky factor of H'⁻¹ that the column loop pushes errors through.
    `static_grids` holds (scale, zero) [N, G] per original-order group when `static_groups` is on;
    `search` is the optional range search every grid fit uses. `dead` marks the inputs (original
    order) whose Hessian diagonal is zero, and `damping` is λ·m, what the factorized H' added to the
    diagonal (m = mean diag H after dead inputs got a unit diagonal): the error identities need both.
    """

    weight: torch.Tensor
    factor: torch.Tensor
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


def weight_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W·H·Wᵀ): the calibration output energy of a linear, what its error tr(ΔW·H·ΔWᵀ) is relative to.

    Computed in float32 with a float64 sum (one GEMM's work), on the weight's device.
    """
    return float(((weight.float() @ hessian.float()) * weight.float()).sum(dtype=torch.float64))


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


FACTOR_TILE = 1024
"""Columns of ΔW·R that `factor_row_errors` forms per matrix product: each product also computes the
zeros below its tile's diagonal, K·T/2 of the N·K²/2 useful multiply-adds per row (3.6% at K = 28672),
while smaller tiles would cost more launches."""


def factor_row_errors(delta: torch.Tensor, prepared: Prepared, tile: int = FACTOR_TILE) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N], of `delta` [N, K] (original column order) through the
    factor R that `prepared` was solved with rather than through H; `delta`'s dead columns are zeroed
    in place (they contribute nothing: H has a zero row and column there).

    H' = H + λ·m·I (dead inputs given a unit diagonal) = R·Rᵀ, so ΔW·H·ΔWᵀ = ‖ΔW·R‖² - λ·m·‖ΔW‖² row
    by row: N·K²/2 multiply-adds in R's precision, as products of ΔW's leading columns with one tile
    of R's columns at a time (torch has no triangular matrix product), in place of the float64
    product with H, 2·N·K². Squares cannot cancel, so float32 keeps the totals within about 1e-6 of
    the float64 product's.
    """
    delta.masked_fill_(prepared.dead, 0.0)
    damping = prepared.damping * row_squares(delta)
    if prepared.perm is not None:
        delta = delta[:, prepared.perm]
    delta = delta.to(prepared.factor.dtype)
    total = torch.zeros_like(damping)
    for start in range(0, delta.shape[1], tile):
        stop = min(start + tile, delta.shape[1])
        total += row_squares(delta[:, :stop] @ prepared.factor[:stop, start:stop])
    return total - damping


def loop_row_errors(scaled_squares: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor,
                    prepared: Prepared) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N], of a GPTQ solve from its column loop's own errors.

    The loop's scaled errors E (processing order) rebuild its change of the prepared weight exactly:
    ΔW' = E·U with U = R⁻¹, so ΔW'·H'·ΔW'ᵀ = E·U·R·Rᵀ·Uᵀ·Eᵀ = ‖E‖² per row, and `scaled_squares`
    (Σ E², float64 [N], summed block by block) is that at no extra cost, where `factor_row_errors`
    needs the product ΔW·R. What H' adds to H is taken off: λ·m·‖ΔW'‖², and ΔW'² once more on dead
    inputs, whose unit diagonal H lacks. ΔW' is `weight` - `dequantized` ([N, K], original order) but
    on dead inputs, zeroed in the prepared weight, where it is -`dequantized` and ΔW is not counted
    (H is zero there).
    """
    delta = (weight - dequantized).masked_fill_(prepared.dead, 0.0)
    at_dead = dequantized[:, prepared.dead]
    return scaled_squares - prepared.damping * row_squares(delta) - (1 + prepared.damping) * row_squares(at_dead)


def row_errors(delta: torch.Tensor, prepared: Prepared, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ΔW·H·ΔWᵀ diagonal, float64 [N]: through the factor on CUDA (`factor_row_errors`, which
    overwrites `delta`), elsewhere from the product with H, exact in float64."""
    return factor_row_errors(delta, prepared) if delta.is_cuda else hessian_row_errors(delta, hessian)


TRIANGULAR_LEAF = 1024
"""Order up to which `invert_upper_` (the oracle's U = R⁻¹) solves against the identity: below it the
solves are too small to keep the GPU busy, and the recursion's extra launches would cost more than the
arithmetic saved."""

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


def hessian_factor(hessian: torch.Tensor, options: GPTQOptions, name: str = "") -> tuple[torch.Tensor, float]:
    """R, the upper-triangular factor of H' = H + λ·mean(diag H)·I = R·Rᵀ, and the damping λ
    (percent/100) used.

    λ starts at `options.damp_percent` and grows x10 (capped at `max_damp_percent`) while the
    factorization fails; past the cap the layer is unsolvable and `SolverError` names it.

    With J the order reversal, the lower Cholesky factor M of J·H'·J gives H' = R·Rᵀ for the upper
    R = J·M·J, so H'⁻¹ = (R⁻¹)ᵀ·R⁻¹: U = R⁻¹ is GPTQ's factor, and R itself is all the solver needs
    (`solve_gptq` inverts only its diagonal tiles; the oracle inverts it whole). One float64
    factorization: the preparation at K = 28672 on an H200 took 0.220 s, 0.465 s with the full inverse.
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
            return lower.flip(0, 1), damp
        if damp >= options.max_damp_percent:
            raise SolverError(
                f"{name}: Hessian is not positive definite even with damping {damp:g} "
                f"(max_damp_percent); the calibration data may be degenerate for this layer"
            )
        damp = min(damp * 10, options.max_damp_percent)


def asymmetric_target(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp_percent: float
) -> torch.Tensor:
    """The weights W* [N, K] whose GPTQ solve on `hessian` H̃ = 2/n·X̃ᵀX̃ minimises ‖W·X - Ŵ·X̃‖²: the float
    model's outputs (inputs X) from the inputs X̃ the quantized stream actually delivers.

    GPTQ's damped objective (Ŵ - W)·(H + λI)·(Ŵ - W)ᵀ is ‖(Ŵ - W)·X‖² + λ‖Ŵ - W‖²; its asymmetric twin
    ‖Ŵ·X̃ - W·X‖² + λ‖Ŵ - W‖² is (Ŵ - W*)·(H̃ + λI)·(Ŵ - W*)ᵀ + const for W* = W·(Cᵀ + λI)·(H̃ + λI)⁻¹, with
    `cross` C = 2/n·X̃ᵀX. So the usual solve on W* also cancels, as far as the grid allows, the error the
    earlier quantized linears left in X̃ (asymmetric calibration, as GPTAQ derives it), and the ridge
    (`damp_percent` of the mean diagonal, dead inputs given a unit diagonal, as `prepare` does) holds
    W* to W, not to 0, along directions the calibration did not see: with X̃ = X, W* is W. Float64,
    returned in `weight`'s dtype.
    """
    h = hessian.to(device=weight.device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    ridge = damp_percent * float(torch.diagonal(h).mean())
    h.diagonal().add_(ridge)
    w = weight.double().T
    rhs = cross.to(device=weight.device, dtype=torch.float64) @ w + ridge * w
    return torch.linalg.solve(h, rhs).T.to(weight.dtype)


def prepare(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: SolvedGrid,
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
    size = group_size_for(k, scheme, name) if isinstance(scheme, QuantScheme) else _ggml_group_size(k, scheme, name)
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
    # A ggml row records no column order: its grids are fit before the solve when the order changes.
    if options.act_order and (isinstance(scheme, QuantScheme) or options.static_groups):
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    factor, damp = hessian_factor(h, options, name)
    return Prepared(
        weight=w,
        factor=factor.to(dtype),
        perm=perm,
        damp_percent=damp,
        damping=damp * float(torch.diagonal(h).mean()),
        dead=dead,
        group_size=size,
        static_grids=static_grids,
        search=search,
    )


def _ggml_group_size(in_features: int, scheme: GGMLScheme, name: str) -> int:
    """A ggml block is a group; `ConfigError` naming the layer when blocks do not tile its rows.

    A ggml row records no column order (no g_idx), so ggml grids take activation ordering only with
    static groups (every block fit before the solve, `GGMLTracker`); otherwise they are solved in
    column order, each block's grid fit when the solve reaches it.
    """
    label = name or "weight"
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
    quantized: Quantized,
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


def column_spans(columns: int, width: int, group_size: int) -> list[tuple[int, int]]:
    """The solver's spans [start, stop): runs of blocks that share one inverted diagonal tile of R.

    A span is one block unless a group is wider than a block (K-quant super-blocks of 256 columns,
    g256+ with 128-column blocks): a group's grid is fit at its first column to the current values
    of all its columns, so such a group is one span, solved block by block inside it. A group that
    covers every column is fit at column 0, before any update, and needs no span of its own.
    """
    span = group_size if width < group_size < columns else width
    return [(start, min(start + span, columns)) for start in range(0, columns, span)]


def diagonal_inverses(factor: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """U_SS = R_SS⁻¹ for each span S of the upper-triangular `factor` R, in its dtype.

    The diagonal tiles of U = R⁻¹ are the inverses of R's, so these are the factors the in-block loop
    needs, without inverting R whole. Solved in float64 (tiles of equal size in one batched solve;
    a shorter last span is a second), whatever R's dtype: the tiles are small.
    """
    inverses: dict[tuple[int, int], torch.Tensor] = {}
    for size in {stop - start for start, stop in spans}:
        chosen = [(start, stop) for start, stop in spans if stop - start == size]
        tiles = torch.stack([factor[start:stop, start:stop] for start, stop in chosen]).double()
        identity = torch.eye(size, dtype=tiles.dtype, device=tiles.device).expand_as(tiles)
        solved = torch.linalg.solve_triangular(tiles, identity, upper=True).to(factor.dtype)
        inverses.update(zip(chosen, solved.unbind(0), strict=True))
    return [inverses[span] for span in spans]


ROW_TILE = 4096
"""Rows per matrix product in the column loop (`_solve_prepared`), and the multiple that shards are cut
at (`shard_bounds`). A matrix library picks its algorithm by shape (cuBLAS splits the inner dimension
across thread blocks when the output has few tiles), so one row may round differently in a product
over 8192 rows and in one over 4096: on an H200 a 2304-row solve and its two shards differed in codes
and grids. Products over the same tiles of rows, with shards cut at tile boundaries, give each row
the same arithmetic in a shard as in the whole solve. Tiles cost launches and smaller products: the
70B block on an H200 took 1.076 s untiled, 1.117 s in tiles of 4096 rows and 1.189 s in tiles of
2048; 4096 still lets two GPUs share an 8192-row layer."""


def shard_bounds(rows: int, shards: int, multiple: int) -> list[int]:
    """Row bounds of at most `shards` shards cut at multiples of `multiple`: the tiles of `multiple`
    rows (the last one possibly short) dealt out as evenly as whole tiles allow, none shorter than
    `multiple` (layers of fewer rows get fewer shards)."""
    tiles = -(-rows // multiple)
    count = max(1, min(shards, rows // multiple))
    return [min(rows, multiple * (tiles * i // count)) for i in range(count + 1)]


def solve_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    options: GPTQOptions,
    *,
    name: str = "",
    search: GridSearch | None = None,
    kernels: KernelPreference = KernelPreference.AUTO,
    devices: Sequence[torch.device | str] | None = None,
) -> GPTQResult:
    """Quantize `weight` [N, K] minimising tr(ΔW·H·ΔWᵀ) for the input Hessian `hessian` [K, K].

    `search` makes every group's grid the best shrunk range (`GridSearch`) rather than min..max.
    The in-block column loop runs as one Triton launch per run of columns on CUDA float32 and as
    the torch twin elsewhere (`bitsmith.kernels.select`); `kernels` overrides that choice.
    A `GGMLScheme` solves on that ggml type's block grids (`bitsmith.algos.kquant_gptq`), whose own
    block search takes the place of `search`.

    `devices` splits the rows into up to one shard per entry (`shard_bounds`; a device may repeat),
    solved concurrently, each against a copy of the factor, and gathered on `weight`'s device: rows
    are independent given H, so the codes and grids are those of the unsharded solve. For layers too
    wide for one GPU's time; the factorization still runs once, on `weight`'s device.

    >>> w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    >>> result = solve_gptq(w, 2 * x.T @ x / 256, QuantScheme(bits=3, group_size=32), GPTQOptions())
    >>> result.weight.codes.shape, result.error < result.rtn_error
    (torch.Size([8, 64]), True)
    """
    if isinstance(scheme, FP8Scheme):
        raise UnsupportedError(f"{name}: GPTQ solves integer and ggml grids; the float8 grid is rounded to "
                               "nearest (method fp8)")
    prepared = prepare(weight, hessian, scheme, options, name, search)
    if not devices:
        return _solve_prepared(prepared, weight, hessian, scheme, options.block_size, kernels, ROW_TILE)
    bounds = shard_bounds(weight.shape[0], len(devices), ROW_TILE)

    def solve_shard(shard: int) -> GPTQResult:
        rows, device = slice(bounds[shard], bounds[shard + 1]), torch.device(devices[shard])
        part = _rows_of(prepared, rows, device)
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            return _solve_prepared(part, weight[rows].to(device), hessian.to(device), scheme, options.block_size,
                                   kernels, ROW_TILE)

    with ThreadPoolExecutor(max_workers=len(bounds) - 1) as pool:
        parts = list(pool.map(solve_shard, range(len(bounds) - 1)))
    return cat_rows(parts, weight.device)


def _rows_of(prepared: Prepared, rows: slice, device: torch.device) -> Prepared:
    """The problem of `rows` alone on `device`: its rows of the weight (a view where the device is the
    same, solved in place like the whole) and of static grids, and the shared factor and column
    bookkeeping copied there."""
    grids = prepared.static_grids
    return replace(
        prepared,
        weight=prepared.weight[rows].to(device),
        factor=prepared.factor.to(device),
        perm=None if prepared.perm is None else prepared.perm.to(device),
        dead=prepared.dead.to(device),
        static_grids=None if grids is None else (grids[0][rows].to(device), grids[1][rows].to(device)),
    )


def _solve_prepared(
    prepared: Prepared,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: SolvedGrid,
    block_size: int,
    kernels: KernelPreference,
    row_tile: int,
) -> GPTQResult:
    """The lazy-block column loop on `prepared` (its weight is overwritten), without a full U = R⁻¹;
    every matrix product runs over tiles of `row_tile` rows (`ROW_TILE`).

    Processed columns are overwritten by their change ΔW (prepared weight minus quantized value).
    With E the scaled errors (ΔW = E·U, E = ΔW·R) and U_<S,S = -U_<S,<S·R_<S,S·U_SS, the errors of
    every column before a span S change it by -E_<S·U_<S,S = ΔW_<S·R_<S,S·U_SS, so one product with
    R's block column brings the span up to date when it comes up, in place of updating every later
    column after each block (which read and wrote the whole rest of the matrix), and only R's
    diagonal tiles are inverted. Inside a span the blocks update the span's later columns as before.
    E_S·U_SS is the span's corrected start values less its quantized ones, so ΔW_S = E_S·U_SS minus
    the correction, whatever constant shift a ggml tracker added at a group start. On an H200 the
    8192x28672 down_proj took 0.60 s this way against 0.88 s with the full inverse and the update of
    every later column.
    """
    # Imported here: the kernels' twin builds on `bitsmith.algos.grid`, so a module-level import
    # would make `bitsmith.algos` and `bitsmith.kernels.select` import each other (and the ggml
    # tracker builds on this module).
    from bitsmith.algos.kquant_gptq import GGMLTracker
    from bitsmith.kernels.gptq_block import BlockSpec
    from bitsmith.kernels.select import choose_block_solver

    tracker: GridTracker | GGMLTracker = (
        GridTracker(prepared, scheme) if isinstance(scheme, QuantScheme) else GGMLTracker(prepared, scheme, hessian)
    )
    w, r = prepared.weight, prepared.factor
    k, size = w.shape[1], prepared.group_size
    codes = torch.zeros_like(w)
    # ‖E‖² per row, for GPTQ's error without a product (`loop_row_errors`); CPU solves use H exactly.
    squares = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if w.is_cuda else None
    width = _block_width(block_size, size, k)
    spans = column_spans(k, width, size)
    solve_block = choose_block_solver(BlockSpec.of(w, width), kernels).solve
    tiles = [slice(row, row + row_tile) for row in range(0, w.shape[0], row_tile)]
    for (first, last), u in zip(spans, diagonal_inverses(r, spans), strict=True):
        # Columns before the span hold ΔW by now (none before the first: the product is zero).
        delta = w.new_empty(w.shape[0], last - first)
        for rows in tiles:
            torch.mm(torch.mm(w[rows, :first], r[:first, first:last]), u, out=delta[rows])
        w[:, first:last] += delta
        delta.neg_()
        for start in range(first, last, width):
            stop = min(start + width, last)
            at, to = start - first, stop - first
            # The block is a view: solved in place, then overwritten by ΔW with the rest of the span.
            block = w[:, start:stop]
            errors = torch.zeros_like(block, memory_format=torch.contiguous_format)
            u_block = u[at:to, at:to].contiguous()
            for begin, end in tracker.runs(start, stop):
                # At a block's first column the whole span is current; inside it, only `block` is.
                offset = begin - start
                current = w[:, begin : begin + size] if offset == 0 else block[:, offset : offset + size]
                scales, zeros, sel = tracker.run_grids(begin, end, current)
                solve_block(block, u_block, scales, zeros, sel, codes[:, start:stop], errors, offset, end - start,
                            tracker.maxq)
            for rows in tiles:
                # In place: `w[:, stop:last] -= errors @ u` would write and read back the product.
                if stop < last:
                    w[rows, stop:last].addmm_(errors[rows], u[at:to, to:], alpha=-1)
                delta[rows, at:].addmm_(errors[rows], u[at:to, at:])
            if squares is not None:
                squares += row_squares(errors)
        w[:, first:last] = delta
    return tracker.finish(codes, weight.to(w.dtype), hessian.to(device=w.device), squares)


def cat_rows(parts: Sequence[GPTQResult], device: torch.device) -> GPTQResult:
    """Results solved on consecutive shards of rows (one factorization), joined on `device`; the
    inverse of `split_rows`."""
    weights = [part.weight for part in parts]
    first = weights[0]
    weight: Quantized
    if isinstance(first, GGMLWeight):
        data = torch.cat([w.data.to(device) for w in weights if isinstance(w, GGMLWeight)])
        weight = GGMLWeight(data=data, scheme=first.scheme, in_features=first.in_features)
    elif isinstance(first, FP8Weight):
        raise ConfigError("GPTQ results are never on the float8 grid")
    else:
        quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
        weight = QuantizedWeight(
            codes=torch.cat([w.codes.to(device) for w in quantized]),
            scales=torch.cat([w.scales.to(device) for w in quantized]),
            zeros=torch.cat([w.zeros.to(device) for w in quantized]),
            g_idx=first.g_idx.to(device),
            scheme=first.scheme,
        )
    rows = torch.cat([part.row_errors.to(device) for part in parts])
    rtn_rows = torch.cat([part.rtn_row_errors.to(device) for part in parts])
    return GPTQResult(
        weight=weight,
        damp_percent=parts[0].damp_percent,
        error=float(rows.sum()),
        rtn_error=float(rtn_rows.sum()),
        row_errors=rows,
        rtn_row_errors=rtn_rows,
    )


def split_rows(result: GPTQResult, sizes: Sequence[int]) -> list[GPTQResult]:
    """Cut a result solved on concatenated rows back into one result per linear, exactly."""
    if sum(sizes) != result.weight.shape[0]:
        raise ConfigError(f"row sizes {list(sizes)} do not add up to {result.weight.shape[0]} rows")
    parts = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append(
            GPTQResult(
                weight=result.weight.rows(rows),
                damp_percent=result.damp_percent,
                error=float(result.row_errors[rows].sum()),
                rtn_error=float(result.rtn_row_errors[rows].sum()),
                row_errors=result.row_errors[rows],
                rtn_row_errors=result.rtn_row_errors[rows],
            )
        )
        start += size
    return parts
