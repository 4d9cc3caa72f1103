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

from bitsmith.kernels import Candidate, Choice, KernelPreference, choose
from bitsmith.kernels.gptq_block import (
    BlockSolver,
    BlockSpec,
    can_implement_triton,
    solve_block_reference,
    solve_block_triton,
)

log = logging.getLogger(__name__)


class BlockSolverChoice(Choice[BlockSolver]):
    """The chosen in-block solver (`solve`, the name the GPTQ loop calls it by), its name, and why."""

    __slots__ = ()

    @property
    def solve(self) -> BlockSolver:
        return self.run


def choose_block_solver(spec: BlockSpec, preference: KernelPreference = KernelPreference.AUTO) -> BlockSolverChoice:
    """The GPTQ in-block solver for `spec` under `preference`; `UnsupportedError` if TRITON cannot run."""
    choice = choose(spec, preference, [Candidate("triton", solve_block_triton, can_implement_triton)],
                    solve_block_reference, problem="GPTQ block kernel", log=log, slow_path="GPTQ block solve")
    return BlockSolverChoice(choice.run, choice.name, choice.reason)


__all__ = ["BlockSolverChoice", "KernelPreference", "choose_block_solver"]
