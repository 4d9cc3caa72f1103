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
    scheme, options = QuantScheme(bits=4, group_size=128), GPTQOptions(damp_percent=0.01)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        h_exact, h_fast = exact[name][0], fast[name][0]
        assert _relative(h_fast, h_exact) < 5e-3
        weight = model.linear_weight(0, name).float().cuda()
        errors = []
        for h in (h_exact, h_fast):
            (solved,) = solve_group([weight], h, method=Method.GPTQ, scheme=scheme, options=options, label=name)
            delta = solved.weight.dequantize().float().cuda() - weight
            errors.append(float(torch.einsum("ij,jk,ik->", delta, h_exact.cuda(), delta)))
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
