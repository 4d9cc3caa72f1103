"""The in-block column loop of GPTQ: round each column, push its error onto the rest of the block.

This is the part of a blocked GPTQ solve that cannot be a matrix product: column i's rounding
depends on the updates of every earlier column. In torch it is ~10 kernel launches per column, so a
4096-column layer pays ~40k launches and the GPU idles; the Triton kernel does a whole run of columns
in one launch, each program holding a tile of rows in registers (rows are independent given the
factor). Both implementations follow one contract, `BlockSolver`, and update their arguments in
place exactly as described on `solve_block_reference`, the torch twin the kernel is tested against.

A "run" is a range of columns [begin, end) of the block whose grids are all known up front: the
caller cuts a block where a new grid must be fit to the weights as updated so far (a group start),
fits it, and calls the solver once per run. Column j of the run is rounded on grid `sel[j - begin]`
of the per-row tables `scales`, `zeros` [N, S] (S = 1 for a freshly fit group; S = G for static
groups, whose grids vary column by column under act-order).

>>> block = torch.tensor([[0.4, 1.0]])
>>> u_block = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
>>> codes, errors = torch.zeros(1, 2), torch.zeros(1, 2)
>>> one = torch.ones(1, 1)
>>> solve_block_reference(block, u_block, one, one, torch.zeros(2, dtype=torch.int32), codes, errors, 0, 2, 3)
>>> codes.tolist(), [round(e, 6) for e in errors[0].tolist()]
([[1.0, 2.0]], [0.4, -0.2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from bitsmith.algos.grid import dequantize, quantize
from bitsmith.errors import ConfigError

MIN_CAPABILITY = (8, 0)
"""Oldest CUDA compute capability the kernel is built and tested for (Ampere)."""

MAX_WIDTH = 256
"""Widest block the kernel holds in registers; wider blocks would spill to local memory."""


class BlockSolver(Protocol):
    """Solve columns [begin, end) of a block in place (see `solve_block_reference`)."""

    def __call__(
        self,
        block: torch.Tensor,
        u_block: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        sel: torch.Tensor,
        codes: torch.Tensor,
        errors: torch.Tensor,
        begin: int,
        end: int,
        maxq: int,
    ) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSpec:
    """What an implementation must support to solve a problem: device, dtype, block width."""

    device_type: str
    dtype: torch.dtype
    width: int
    capability: tuple[int, int] | None
    """CUDA compute capability of the device; None off CUDA."""

    @classmethod
    def of(cls, weight: torch.Tensor, width: int) -> BlockSpec:
        device = weight.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return cls(device_type=device.type, dtype=weight.dtype, width=width, capability=capability)


def solve_block_reference(
    block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    sel: torch.Tensor,
    codes: torch.Tensor,
    errors: torch.Tensor,
    begin: int,
    end: int,
    maxq: int,
) -> None:
    """The torch twin: for each column i in [begin, end) of `block` [N, W] (any device and dtype),

    codes[:, i]   = clamp(round(block[:, i] / scale) + zero, 0, maxq)   on grid sel[i - begin]
    errors[:, i]  = (block[:, i] - scale·(codes[:, i] - zero)) / u_block[i, i]
    block[:, i:] -= errors[:, i] ⊗ u_block[i, i:]

    where `u_block` [W, W] is the block's diagonal tile of the upper Cholesky factor of H⁻¹.
    """
    for i, grid in zip(range(begin, end), sel.tolist(), strict=True):
        scale, zero = scales[:, grid], zeros[:, grid]
        q = quantize(block[:, i : i + 1], scale, zero, maxq)
        codes[:, i] = q[:, 0]
        err = (block[:, i] - dequantize(q, scale, zero)[:, 0]) / u_block[i, i]
        block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
        errors[:, i] = err


def can_implement_triton(spec: BlockSpec) -> tuple[bool, str]:
    """Whether the Triton kernel can solve `spec`, and if not, why (for `select`'s report)."""
    if spec.device_type != "cuda" or spec.capability is None:
        return False, f"triton: needs a CUDA device, got {spec.device_type}"
    if spec.capability < MIN_CAPABILITY:
        return False, f"triton: needs compute capability >= {MIN_CAPABILITY}, got {spec.capability}"
    if spec.dtype != torch.float32:
        return False, f"triton: computes in float32, got {spec.dtype}"
    if spec.width > MAX_WIDTH:
        return False, f"triton: block width {spec.width} > {MAX_WIDTH} would spill registers"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton: not installed"
    return True, "triton: CUDA float32 block"


def rows_per_program(rows: int, processors: int) -> int:
    """Rows each program keeps in registers: as many as still give every multiprocessor two programs
    (more rows per program amortise the per-column loads; short layers need the parallelism)."""
    for candidate in (32, 16):
        if -(-rows // candidate) >= 2 * processors:
            return candidate
    return 8


def solve_block_triton(
    block: torch.Tensor,
    u_block: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    sel: torch.Tensor,
    codes: torch.Tensor,
    errors: torch.Tensor,
    begin: int,
    end: int,
    maxq: int,
) -> None:
    """`solve_block_reference` as one Triton launch (float32; `block`/`codes` may be column slices)."""
    from bitsmith.kernels import gptq_block_triton

    if block.stride(1) != 1 or codes.stride(1) != 1 or not errors.is_contiguous():
        raise ConfigError(
            f"triton block solve needs unit column strides and contiguous errors, got strides "
            f"block {block.stride()}, codes {codes.stride()}, errors {errors.stride()}"
        )
    processors = torch.cuda.get_device_properties(block.device).multi_processor_count if block.is_cuda else 1
    gptq_block_triton.launch(
        block,
        u_block.contiguous(),
        scales.contiguous(),
        zeros.contiguous(),
        sel.to(device=block.device, dtype=torch.int32).contiguous(),
        codes,
        errors,
        begin,
        end,
        maxq,
        rows_per_program(block.shape[0], processors),
    )
