"""RTN against the reference model README's protocol, written out independently here."""

from __future__ import annotations

import pytest
import torch
from bitsmith.algos import get_method, quantize_rtn
from bitsmith.errors import ConfigError, SolverError, UnsupportedError
from bitsmith.schemes import GPTQOptions, Method, QuantScheme


def _readme_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The README: per row, groups of `group` columns, (max - min) / (2^b - 1), zero clamped."""
    maxq = 2**bits - 1
    g = w.reshape(w.shape[0], -1, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, maxq) - zero) * scale).reshape(w.shape)


@pytest.mark.parametrize("bits", [3, 4])
def test_matches_readme_protocol_on_demo_weights(demo_checkpoint, bits: int) -> None:  # type: ignore[no-untyped-def]
    for local in ("self_attn.q_proj", "mlp.down_proj"):
        w = demo_checkpoint.linear_weight(1, local)
        qw = quantize_rtn(w, QuantScheme(bits=bits, group_size=128))
        assert qw.codes.dtype == torch.uint8 and qw.zeros.dtype == torch.int32
        assert qw.scales.shape == (w.shape[0], w.shape[1] // 128)
        assert torch.equal(qw.g_idx, (torch.arange(w.shape[1]) // 128).int())
        torch.testing.assert_close(qw.dequantize(), _readme_rtn(w, bits, 128), rtol=0, atol=1e-6)


def test_per_channel_and_symmetric() -> None:
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, QuantScheme(bits=8, group_size=-1, sym=True))
    assert qw.scales.shape == (8, 1) and (qw.zeros == 128).all() and (qw.g_idx == 0).all()
    assert (qw.dequantize() - w).abs().max() <= qw.scales.max() / 2 + 1e-6


def test_bad_inputs_name_the_layer() -> None:
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj: group_size 100"):
        quantize_rtn(torch.zeros(4, 768), QuantScheme(group_size=100), name="model.layers.0.mlp.down_proj")
    bad = torch.zeros(4, 128)
    bad[1, 2] = float("inf")
    with pytest.raises(SolverError, match="q_proj: weight contains NaN or Inf"):
        quantize_rtn(bad, QuantScheme(), name="q_proj")


def test_registry() -> None:
    rtn = get_method(Method.RTN)
    assert not Method.RTN.needs_calibration and Method.GPTQ.needs_calibration and Method.AWQ.needs_calibration
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    result = rtn.solve(w, None, QuantScheme(), GPTQOptions(), "x")
    assert torch.equal(result.weight.codes, quantize_rtn(w, QuantScheme()).codes)
    h = torch.eye(128)
    measured = rtn.solve(w, h, QuantScheme(), GPTQOptions(), "x")
    assert measured.error == pytest.approx(float(((w - result.weight.dequantize()) ** 2).sum()), rel=1e-5)
    with pytest.raises(UnsupportedError, match="known"):
        get_method("bogus")  # type: ignore[arg-type]
