"""The GPTQ in-block solver: the torch twin's contract, the kernel selection, and (where Triton is
installed) the Triton kernel run by Triton's CPU interpreter against the twin."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from bitsmith.algos import solve_gptq, solve_gptq_reference
from bitsmith.algos.grid import dequantize, fit_grid, quantize
from bitsmith.errors import UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.gptq_block import BlockSpec, solve_block_reference
from bitsmith.kernels.select import choose_block_solver
from bitsmith.schemes import GPTQOptions, QuantScheme

MAXQ = 15


def _block_problem(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of weights and the diagonal tile of the upper Cholesky factor of a damped H⁻¹."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    x = torch.randn(4 * width, width, generator=gen, dtype=torch.float64)
    h = x.T @ x / x.shape[0] + 0.01 * torch.eye(width, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return block, u


def _solve(block: torch.Tensor, u: torch.Tensor, runs: list[tuple[int, int]], grids: torch.Tensor | None = None):
    """Run the twin over `runs`, fitting a fresh grid at each run's start unless static `grids` are given."""
    block = block.clone()
    codes, errors = torch.zeros_like(block), torch.zeros_like(block)
    for begin, end in runs:
        if grids is None:
            scale, zero = fit_grid(block[:, begin:end], QuantScheme(bits=4))
            scales, zeros, sel = scale[:, None], zero[:, None], torch.zeros(end - begin, dtype=torch.int32)
        else:
            scales, zeros = grids[0], grids[1]
            sel = torch.arange(begin, end, dtype=torch.int32) % scales.shape[1]
        solve_block_reference(block, u, scales, zeros, sel, codes, errors, begin, end, MAXQ)
    return block, codes, errors


def test_twin_leaves_dequantized_columns_and_errors_that_rebuild_the_block() -> None:
    """After a run: solved columns hold their dequantized values, unsolved ones are untouched before
    `begin`, and W_before - W_after = E·U exactly (the rank-1 updates are the whole change)."""
    block, u = _block_problem(24, 64, seed=0)
    after, codes, errors = _solve(block, u, [(8, 40)])
    torch.testing.assert_close(after - block, -(errors[:, 8:40] @ u[8:40, :]), rtol=0, atol=1e-12)
    assert torch.equal(after[:, :8], block[:, :8])
    assert torch.all(errors[:, :8] == 0) and torch.all(errors[:, 40:] == 0)
    scale, zero = fit_grid(block[:, 8:40], QuantScheme(bits=4))
    torch.testing.assert_close(after[:, 8:40], dequantize(codes[:, 8:40], scale, zero), rtol=0, atol=1e-12)
    assert float(codes.min()) >= 0 and float(codes.max()) <= MAXQ


def test_twin_rounds_each_column_on_its_selected_grid() -> None:
    block, u = _block_problem(16, 32, seed=1)
    grids = torch.stack([torch.full((16, 2), 0.1, dtype=torch.float64), torch.tensor([[3.0, 9.0]]).expand(16, 2)])
    _, codes, errors = _solve(block, u, [(0, 32)], grids=grids)
    # Column 0 is rounded as given on grid 0; column 1, after column 0's update, on grid 1 (zero 9).
    assert torch.equal(codes[:, :1], quantize(block[:, :1], grids[0][:, 0], grids[1][:, 0], MAXQ))
    updated = block[:, 1:2] - errors[:, :1] * u[0, 1]
    assert torch.equal(codes[:, 1:2], quantize(updated, grids[0][:, 1], grids[1][:, 1], MAXQ))
    assert not torch.equal(codes[:, 1:2], quantize(updated, grids[0][:, 0], grids[1][:, 0], MAXQ))


def test_solve_gptq_twin_is_the_oracle_in_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(12, 256, generator=gen, dtype=torch.float64)
    x = torch.randn(1024, 256, generator=gen, dtype=torch.float64) * torch.rand(256, generator=gen, dtype=torch.float64)
    h = x.T @ x / 1024
    scheme, options = QuantScheme(bits=3, group_size=32), GPTQOptions(act_order=True, block_size=64)
    twin = solve_gptq(w, h, scheme, options, kernels=KernelPreference.REFERENCE)
    assert torch.equal(twin.weight.codes, solve_gptq_reference(w, h, scheme, options).weight.codes)


def test_selection_reports_why() -> None:
    cpu = BlockSpec(device_type="cpu", dtype=torch.float32, width=128, capability=None)
    choice = choose_block_solver(cpu)
    assert (choice.name, choice.solve) == ("reference", solve_block_reference)
    assert "CUDA" in choice.reason
    assert choose_block_solver(cpu, KernelPreference.REFERENCE).reason == "reference forced by preference"
    with pytest.raises(UnsupportedError, match="needs a CUDA device, got cpu"):
        choose_block_solver(cpu, KernelPreference.TRITON)
    gpu64 = BlockSpec(device_type="cuda", dtype=torch.float64, width=128, capability=(9, 0))
    assert "float32, got torch.float64" in choose_block_solver(gpu64).reason
    wide = BlockSpec(device_type="cuda", dtype=torch.float32, width=512, capability=(9, 0))
    assert "block width 512" in choose_block_solver(wide).reason
    old = BlockSpec(device_type="cuda", dtype=torch.float32, width=128, capability=(7, 5))
    assert "compute capability" in choose_block_solver(old).reason


def test_importing_the_solver_does_not_load_triton() -> None:
    """Both import orders work (no cycle) and neither imports Triton."""
    for first in ("bitsmith.kernels.select", "bitsmith.algos"):
        code = f"import sys, {first}, bitsmith.algos, bitsmith.kernels.select; print('triton' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False", out.stderr


INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from bitsmith.algos.grid import fit_grid
    from bitsmith.kernels.gptq_block import solve_block_reference, solve_block_triton
    from bitsmith.schemes import QuantScheme

    gen = torch.Generator().manual_seed(3)
    n, width = 37, 96
    block = torch.randn(n, width, generator=gen)
    x = torch.randn(4 * width, width, generator=gen, dtype=torch.float64)
    h = x.T @ x / x.shape[0] + 0.01 * torch.eye(width, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale, zero = fit_grid(block[:, 10:42], QuantScheme(bits=4))
    static = torch.stack([scale, scale * 1.5], 1), torch.stack([zero, zero.clamp(max=14) + 1], 1)
    runs = [((scale[:, None], zero[:, None]), torch.zeros(32, dtype=torch.int32), 10, 42),
            (static, torch.arange(42, 90, dtype=torch.int32) % 2, 42, 90)]
    results = []
    for solve in (solve_block_reference, solve_block_triton):
        b = block.clone()
        codes, errors = torch.full((n, width), -1.0), torch.zeros(n, width)
        for (scales, zeros), sel, begin, end in runs:
            solve(b, u, scales, zeros, sel, codes, errors, begin, end, 15)
        results.append((b, codes, errors))
    (b0, c0, e0), (b1, c1, e1) = results
    print(int((c0 != c1).sum()), float((e0 - e1).abs().max()), float((b0 - b1).abs().max()))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_twin_in_interpreter() -> None:
    """The kernel itself, run by Triton's interpreter on CPU tensors (in a fresh process, because
    TRITON_INTERPRET is read when the kernel is defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mismatched, error_diff, block_diff = out.stdout.split()
    assert int(mismatched) == 0
    assert float(error_diff) < 1e-5 and float(block_diff) < 1e-5
