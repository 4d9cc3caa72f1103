"""Choose the implementation of a kernel-backed step, and say why.

Candidates are tried in order (fastest first) and the first that can implement the problem wins; the
torch twin implements everything, so AUTO always finds one and says why the faster ones were passed
over. `KernelPreference.REFERENCE` forces the twin (CPU CI, debugging, A/B on a GPU);
`KernelPreference.TRITON` demands the kernel and fails with every reason rather than fall back.

>>> import torch
>>> choice = choose_block_solver(BlockSpec(device_type="cpu", dtype=torch.float32, width=128, capability=None))
>>> choice.name, choice.reason
('reference', 'triton: needs a CUDA device, got cpu')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

from bitsmith.errors import UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.gptq_block import (
    BlockSolver,
    BlockSpec,
    can_implement_triton,
    solve_block_reference,
    solve_block_triton,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockSolverChoice:
    """The chosen implementation, its name, and why it (and not a faster one) was chosen."""

    solve: BlockSolver
    name: str
    reason: str


def choose_block_solver(spec: BlockSpec, preference: KernelPreference = KernelPreference.AUTO) -> BlockSolverChoice:
    """The GPTQ in-block solver for `spec` under `preference`; `UnsupportedError` if TRITON cannot run."""
    if preference == KernelPreference.REFERENCE:
        return BlockSolverChoice(solve_block_reference, "reference", "reference forced by preference")
    ok, reason = can_implement_triton(spec)
    if ok:
        return BlockSolverChoice(solve_block_triton, "triton", reason)
    if preference == KernelPreference.TRITON:
        raise UnsupportedError(f"no GPTQ block kernel for {spec}: {reason}")
    if spec.device_type == "cuda":
        _log_fallback_once(reason)
    return BlockSolverChoice(solve_block_reference, "reference", reason)


@cache
def _log_fallback_once(reason: str) -> None:
    """A GPU solve on the slow path is worth one warning per cause, not one per layer."""
    log.warning("GPTQ block solve on CUDA uses the torch twin: %s", reason)


__all__ = ["BlockSolverChoice", "KernelPreference", "choose_block_solver"]
