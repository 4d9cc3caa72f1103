"""The calibrator's TensorFloat-32 products: they engage (the numbers change), stay within TF32's rounding
of exact float32, and GPTQ solved on their Hessians loses nothing measurable against exact ones.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.calib import forward_block
from bitsmith.devices import MatmulPrecision, matmul_precision
from bitsmith.models import load_checkpoint
from bitsmith.pipeline import collect_stats, solve_group
from bitsmith.schemes import GPTQOptions, Method, QuantScheme

from tests.unit.test_block_residency import random_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gptq_errors(weight: torch.Tensor, h_exact: torch.Tensor, h_fast: torch.Tensor, name: str) -> list[float]:
    """GPTQ w4 g128's error tr(ΔW·H·ΔWᵀ) under the exact Hessian, solved on the exact and on the fast one."""
    scheme, options = QuantScheme(bits=4, group_size=128), GPTQOptions(damp_percent=0.01)
    errors = []
    for h in (h_exact, h_fast):
        (solved,) = solve_group([weight], h, method=Method.GPTQ, scheme=scheme, options=options, label=name)
        delta = solved.weight.dequantize().float().cuda() - weight
        errors.append(float(torch.einsum("ij,jk,ik->", delta, h_exact.cuda(), delta)))
    return errors


def test_tf32_hessians_and_outputs_stay_within_its_rounding_and_gptq_loses_nothing(tmp_path: Path) -> None:
    model = load_checkpoint(random_llama(tmp_path / "m", layers=1, hidden=1024, ffn=2816), device="cuda")
    hidden = model.embed(torch.randint(0, 1000, (16, 256), generator=torch.Generator().manual_seed(0)))
    names = [n for group in model.groups(0) for n in group]
    runs = {}
    for precision in MatmulPrecision:
        with matmul_precision(torch.device("cuda"), precision):
            runs[precision] = collect_stats(model, 0, names, hidden, {}), forward_block(model, 0, hidden)
    assert torch.get_float32_matmul_precision() == "highest"  # restored
    (exact, exact_out), (fast, fast_out) = runs[MatmulPrecision.HIGHEST], runs[MatmulPrecision.HIGH]
    assert not torch.equal(fast_out, exact_out)  # TF32 did run
    assert _relative(fast_out, exact_out) < 5e-3
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        h_exact, h_fast = exact[name][0], fast[name][0]
        assert _relative(h_fast, h_exact) < 5e-3
        errors = _gptq_errors(model.linear_weight(0, name).float().cuda(), h_exact, h_fast, name)
        assert errors[1] <= 1.01 * errors[0], (name, errors)


def test_cross_statistics_on_cuda_are_the_cpus_within_tf32_rounding(tmp_path: Path) -> None:
    """Asymmetric calibration's two streams on the GPU: the Hessians and cross statistics of a block whose
    two streams differ match a float64 CPU computation, and with equal streams the cross statistics are the
    Hessian itself, bit for bit (the same products of the same rows)."""
    path = random_llama(tmp_path / "m", layers=1, hidden=1024, ffn=2816)
    tokens = torch.randint(0, 1000, (8, 256), generator=torch.Generator().manual_seed(0))
    names = [n for group in (load_checkpoint(path, device="cpu").groups(0)) for n in group]
    results = {}
    for device in ("cpu", "cuda"):
        model = load_checkpoint(path, device=device)
        hidden = model.embed(tokens)
        shifted = hidden + 0.05 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(hidden)
        with matmul_precision(torch.device(device), MatmulPrecision.HIGH):
            results[device] = collect_stats(model, 0, names, shifted, {}, (hidden, {}))
            if device == "cuda":
                same = collect_stats(model, 0, names, hidden, {}, (hidden, {}))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        cpu, gpu = results["cpu"][name], results["cuda"][name]
        assert cpu.cross is not None and gpu.cross is not None
        assert _relative(gpu.hessian.cpu(), cpu.hessian) < 5e-3
        assert _relative(gpu.cross.cpu(), cpu.cross) < 5e-3
        assert not torch.equal(gpu.cross, gpu.hessian)
        assert torch.equal(same[name].cross, same[name].hessian)


def test_bfloat16_blocks_stay_within_its_rounding_and_gptq_loses_little(tmp_path: Path) -> None:
    """`MatmulPrecision.BFLOAT16`: the block runs in bfloat16 (its outputs are bfloat16, within bfloat16's
    rounding of exact float32), the Hessians multiply bfloat16 rows on tensor cores into float32 (the same
    sums as float64 products of those rows, up to float32 rounding), and GPTQ solved on them stays within
    2% of the error it reaches on exact float32 Hessians."""
    from bitsmith.calib import HessianAccumulator

    path = random_llama(tmp_path / "m", layers=1, hidden=1024, ffn=2816)
    exact = load_checkpoint(path, device="cuda")
    fast = load_checkpoint(path, device="cuda", compute_dtype=MatmulPrecision.BFLOAT16.compute_dtype)
    hidden = exact.embed(torch.randint(0, 1000, (16, 256), generator=torch.Generator().manual_seed(0)))
    names = [n for group in exact.groups(0) for n in group]
    with matmul_precision(torch.device("cuda"), MatmulPrecision.HIGHEST):
        reference, reference_out = collect_stats(exact, 0, names, hidden, {}), forward_block(exact, 0, hidden)
    with matmul_precision(torch.device("cuda"), MatmulPrecision.BFLOAT16):
        stats, out = collect_stats(fast, 0, names, hidden, {}), forward_block(fast, 0, hidden)
    assert out.dtype is torch.bfloat16
    assert _relative(out.float(), reference_out) < 2e-2
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        h_exact, h_fast = reference[name][0], stats[name][0]
        assert h_fast.dtype is torch.float32 and _relative(h_fast, h_exact) < 2e-2
        errors = _gptq_errors(exact.linear_weight(0, name).float().cuda(), h_exact, h_fast, name)
        assert errors[1] <= 1.02 * errors[0], (name, errors)
    rows = torch.randn(4096, 512, device="cuda").bfloat16()
    acc = HessianAccumulator(512, device="cuda")
    acc.add(rows)
    exact_sum = rows.double().T @ rows.double() * (2.0 / 4096)
    error = _relative(acc.hessian().double(), exact_sum)
    assert error < 2e-5, error  # float32 sums (a bfloat16 product would be off by about 4e-3)
