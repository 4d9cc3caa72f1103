"""GPTQ on ggml's block grids: the grid tracker `solve_gptq` uses for a `GGMLScheme`.

llama-quantize rounds every block to its nearest codes; here each block's parameters (d, dmin and
the sub-block scales and mins, exactly as `kquant.fit` chooses them, importance-weighted by the
Hessian diagonal when the scheme asks) are fit when GPTQ reaches the block, to the weights as
updated by the error compensation so far, and the block's columns are then rounded one by one on
those fixed sub-block grids while GPTQ pushes each column's error onto the columns still to come.
The result is the same file layout, with codes that minimise tr(ΔW·H·ΔWᵀ) rather than |ΔW|.

Every sub-block grid is affine, value = a·(code - offset) - b with integer codes in [0, maxq], and
maps onto the block solver's per-row (scale, zero) tables: scale a, zero the type's integral code
offset. The solver rounds round(w/scale) + zero, which is the grid's nearest code only for an
integral zero, so the non-integral part b is moved into the weights instead: when a block is fit,
its columns of the working matrix are shifted by +b. GPTQ's updates are additive and its errors are
differences w - value, both blind to a constant shift, and a solved column is never read again.
A sub-block whose a is 0 holds the single value -b whatever its codes; its scale becomes
`FLAT_SCALE`, so every weight rounds to the offset code and the value 0 (-b once unshifted) exactly.

With activation ordering (`Prepared.perm`, GPTQ's default with static groups) every block is fit before
the solve, to the weights as the checkpoint has them, and the whole working matrix is shifted once; the
columns are then solved in order of decreasing Hessian diagonal, each on its own block's grid. A ggml
row records no column order, and needs none: its grids do not depend on the order the codes were found
in, just as GPTQ's static groups keep an integer checkpoint free of g_idx.
"""

from __future__ import annotations

import itertools

import torch

from bitsmith.algos import kquant
from bitsmith.algos.gptq import GPTQResult, Prepared, row_errors, solved_result
from bitsmith.algos.kquant_search import div, seq_sum
from bitsmith.quantized import GGMLWeight
from bitsmith.schemes import GGMLScheme

FLAT_SCALE = 2.0**100
"""Stand-in scale of a flat sub-block (a = 0): any weight below 2⁹⁹ in magnitude rounds to code 0."""


class GGMLTracker:
    """The `GridTracker` contract (`runs`, `run_grids`, `finish`, `maxq`) for a ggml type.

    A ggml block (32 weights for the legacy types, a 256-weight super-block for the K-quants) is
    one group: its parameters are fit when its first column comes up, and its S sub-block grids
    form the run's tables, with `sel` naming each column's sub-block.
    """

    def __init__(self, prepared: Prepared, scheme: GGMLScheme, hessian: torch.Tensor) -> None:
        self._prepared = prepared
        self._scheme = scheme
        self._type = scheme.type
        self._layout = kquant.layout(scheme.type)
        w = prepared.weight
        self._importance = (
            torch.diagonal(hessian).to(device=w.device, dtype=torch.float32) if scheme.importance else None
        )
        # The legacy types' imatrix weights use the variance of the whole row; a block at a time, the
        # row as it was before the solve stands in for it.
        legacy = self._layout.family in (kquant.Family.LEGACY_SYMMETRIC, kquant.Family.LEGACY_AFFINE)
        self._row_sigma2 = (
            div(seq_sum(w.float() * w.float()), w.shape[1])
            if legacy and self._importance is not None
            else None
        )
        self._fitted: list[kquant.Blocks] = []
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._static_sel: torch.Tensor | None = None
        if prepared.perm is not None:
            self._fit_all(prepared.perm)

    @property
    def maxq(self) -> int:
        """The largest code."""
        return self._layout.maxq

    def runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Cut [start, stop) before every block start: a block's grids are fit at its first column
        (one run when every grid was fit before the solve)."""
        if self._static_sel is not None:
            return [(start, stop)]
        size = self._type.block_size
        bounds = [start, *(c for c in range(start + 1, stop) if c % size == 0), stop]
        return list(itertools.pairwise(bounds))

    def run_grids(
        self, begin: int, end: int, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scales, zeros [N, S], sel int32 [end - begin]) for columns [begin, end) of one block.

        At a block start `current` (the working matrix's columns from `begin`, as updated so far) is
        fit and its block's columns are shifted in place by the grids' b (see the module docstring).
        """
        if self._static_sel is not None:
            scales, zeros = self._tables[0]
            return scales, zeros, self._static_sel[begin:end]
        size, sub = self._type.block_size, self._layout.sub_block
        if begin % size == 0:
            self._tables.append(self._fit(begin, current[:, :size]))
        scales, zeros = self._tables[-1]
        sel = torch.arange(begin % size, begin % size + end - begin, device=current.device) // sub
        return scales, zeros, sel.to(torch.int32)

    def _fit(self, begin: int, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size, lay = self._type.block_size, self._layout
        importance = None if self._importance is None else self._importance[begin : begin + size]
        fitted = kquant.fit(block.float(), self._type, importance, self._row_sigma2)
        self._fitted.append(fitted)
        a, b = kquant.grid(fitted, self._type)
        block += b.repeat_interleave(lay.sub_block, dim=1).to(block.dtype)
        scales = torch.where(a != 0, a, torch.full_like(a, FLAT_SCALE)).to(block.dtype)
        return scales, torch.full_like(scales, float(lay.offset))

    def _fit_all(self, perm: torch.Tensor) -> None:
        """Fit every block to the unpermuted weights, shift each processing-order column by its grid's b
        and keep one table of every sub-block grid, `sel` naming each column's."""
        w = self._prepared.weight
        original = torch.empty_like(w).index_copy_(1, perm, w)
        fitted = kquant.fit(original.float(), self._type, self._importance, self._row_sigma2)
        self._fitted.append(fitted)
        a, b = kquant.grid(fitted, self._type)
        sub_of = perm // self._layout.sub_block
        w += b[:, sub_of].to(w.dtype)
        scales = torch.where(a != 0, a, torch.full_like(a, FLAT_SCALE)).to(w.dtype)
        self._tables.append((scales, torch.full_like(scales, float(self._layout.offset))))
        self._static_sel = sub_of.to(torch.int32)

    def reference_row_errors(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The per-row errors (`row_errors`) of llama.cpp's rounding (`kquant.quantize`, same importance),
        the baseline `GPTQResult.rtn_error` reports."""
        rtn = kquant.quantize(weight, self._type, self._importance)
        return row_errors(weight - rtn.dequantize(weight.dtype), self._prepared, hessian)

    def finish(
        self,
        codes: torch.Tensor,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        scaled_squares: torch.Tensor | None = None,
    ) -> GPTQResult:
        """The fitted grids holding GPTQ's codes [N, K] (processing order) as ggml bytes, with errors as
        `GridTracker.finish` gives them."""
        perm = self._prepared.perm
        if perm is not None:
            codes = torch.empty_like(codes).scatter_(1, perm.expand_as(codes), codes)
        fitted = kquant.cat_blocks(self._fitted, 1).with_codes(codes)
        quantized = GGMLWeight(data=kquant.pack(fitted, self._type), scheme=self._scheme, in_features=codes.shape[1])
        rtn_row_errors = self.reference_row_errors(weight, hessian)
        return solved_result(quantized, weight, hessian, self._prepared, scaled_squares, rtn_row_errors)
