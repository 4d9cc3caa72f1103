"""Grid fitting per FORMATS.md §1.3, including the min_zero refit for GPTQ v1 checkpoints."""

from __future__ import annotations

import pytest
import torch
from bitsmith.algos.grid import dequantize, fit_grid, group_size_for, quantize
from bitsmith.errors import ConfigError
from bitsmith.schemes import GridSearch, QuantScheme


def test_asymmetric_range_includes_zero() -> None:
    w = torch.tensor([[0.5, 2.0, 1.0], [-3.0, -1.0, 0.0], [-1.0, 0.5, 0.25]])
    scale, zero = fit_grid(w, QuantScheme(bits=4))
    torch.testing.assert_close(scale, torch.tensor([2.0 / 15, 3.0 / 15, 1.5 / 15]))
    torch.testing.assert_close(zero, torch.tensor([0.0, 15.0, 10.0]))


def test_symmetric_zero_is_midpoint() -> None:
    w = torch.tensor([[-0.5, 2.0], [-4.0, 1.0]])
    for bits, mid in [(2, 2.0), (3, 4.0), (4, 8.0), (8, 128.0)]:
        maxq = 2**bits - 1
        scale, zero = fit_grid(w, QuantScheme(bits=bits, sym=True))
        torch.testing.assert_close(scale, torch.tensor([4.0 / maxq, 8.0 / maxq]))
        assert zero.tolist() == [mid, mid]


def test_all_zero_rows_get_unit_range() -> None:
    scale, zero = fit_grid(torch.zeros(2, 4), QuantScheme(bits=4))
    torch.testing.assert_close(scale, torch.full((2,), 2.0 / 15))
    torch.testing.assert_close(zero, torch.round(1.0 / scale))  # zero in the middle of [-1, 1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_error_is_half_a_step(bits: int) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    scheme = QuantScheme(bits=bits)
    scale, zero = fit_grid(w, scheme)
    codes = quantize(w, scale, zero, scheme.maxq)
    assert codes.min() >= 0 and codes.max() <= scheme.maxq
    assert torch.equal(codes, codes.round())
    err = (dequantize(codes, scale, zero) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-6).all()


def test_min_zero_refits_scale_to_cover_range() -> None:
    w = torch.randn(256, 32, generator=torch.Generator().manual_seed(0)).abs() + 0.01
    w[:, 0] = -0.001  # a tiny negative: the natural zero rounds to 0
    free = fit_grid(w, QuantScheme(bits=4))
    assert (free[1] == 0).all()
    scheme = QuantScheme(bits=4, min_zero=1)
    scale, zero = fit_grid(w, scheme)
    assert (zero >= 1).all()
    codes = quantize(w, scale, zero, scheme.maxq)
    err = (dequantize(codes, scale, zero) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-6).all(), "grid with min_zero must still cover the range"
    torch.testing.assert_close(scale, w.max(dim=1).values / 14)


def test_min_zero_leaves_natural_zeros_alone() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    assert (fit_grid(w, QuantScheme(bits=4))[1] >= 1).all()
    for a, b in zip(fit_grid(w, QuantScheme(bits=4)), fit_grid(w, QuantScheme(bits=4, min_zero=1)), strict=True):
        assert torch.equal(a, b)


def test_group_size_must_divide_and_names_layer() -> None:
    assert group_size_for(768, QuantScheme(group_size=128)) == 128
    assert group_size_for(768, QuantScheme(group_size=-1)) == 768
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj: group_size 100"):
        group_size_for(768, QuantScheme(group_size=100), "model.layers.0.mlp.down_proj")


def test_grid_search_never_worse_and_clips_outliers() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    w[:8, 0] = 12.0  # one outlier per row in the first eight rows
    search = GridSearch(steps=25, norm=2.0)
    assert search.factors[0] == 1.0 and len(search.factors) == 20 and search.factors[-1] == pytest.approx(0.24)
    for scheme in (QuantScheme(bits=3), QuantScheme(bits=4, sym=True), QuantScheme(bits=4, min_zero=1)):
        plain = fit_grid(w, scheme)
        best = fit_grid(w, scheme, search)

        def error(grid: tuple[torch.Tensor, torch.Tensor], s: QuantScheme = scheme) -> torch.Tensor:
            return (dequantize(quantize(w, *grid, s.maxq), *grid) - w).pow(2).sum(1)

        assert (error(best) <= error(plain) + 1e-6).all()
        assert error(best)[:8].sum() < error(plain)[:8].sum()
        assert (best[0] <= plain[0] * (1 + 1e-6)).all(), "the search only ever clips the range"
        assert (best[0][:8] < plain[0][:8]).any(), "outlier rows get a finer, clipped grid"
        if not scheme.sym:
            assert (best[1] >= scheme.min_zero).all()


@pytest.mark.parametrize("bad", [{"steps": 0}, {"max_shrink": 1.0}, {"norm": 0.0}])
def test_grid_search_validates(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        GridSearch(**bad)  # type: ignore[arg-type]
