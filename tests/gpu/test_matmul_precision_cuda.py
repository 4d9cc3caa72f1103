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
