"""The blocked GPTQ solver against the column-by-column oracle, and its robustness contract."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bitsmith.algos import get_method, gptq, solve_gptq, solve_gptq_reference, split_rows
from bitsmith.algos.gptq import (
    asymmetric_target,
    column_spans,
    diagonal_inverses,
    factor_row_errors,
    hessian_factor,
    hessian_row_errors,
    invert_upper_,
    loop_row_errors,
    prepare,
    row_squares,
    shard_bounds,
)
from bitsmith.errors import CalibrationError, ConfigError, SolverError
from bitsmith.quantized import GGMLWeight, QuantizedWeight
from bitsmith.schemes import GGMLScheme, GGMLType, GPTQOptions, GridSearch, Method, QuantScheme, Scheme


def _problem(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated, unevenly scaled Hessian like a real linear's input statistics."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=dtype)
    mix = torch.randn(cols, cols, generator=gen, dtype=dtype) / cols**0.5
    x = torch.randn(4 * cols, cols, generator=gen, dtype=dtype) @ mix
    x = x * torch.rand(cols, generator=gen, dtype=dtype).mul(3).add(0.1)
    return w, 2 * x.T @ x / x.shape[0]


CASES = [
    # (rows, cols, bits, group, sym, act_order, static_groups, block, min_zero)
    (32, 256, 4, 128, False, False, False, 128, 0),
    (24, 192, 3, 64, True, False, False, 128, 0),
    (16, 256, 2, 32, False, True, False, 48, 0),
    (40, 128, 8, -1, False, False, False, 32, 0),
    (16, 160, 4, -1, True, True, False, 64, 0),
    (24, 256, 3, 64, False, True, True, 128, 0),
    (8, 384, 4, 128, False, True, False, 32, 0),
    (12, 256, 4, 32, False, True, True, 100, 1),
    (20, 96, 2, 16, True, True, True, 40, 0),
    (16, 768, 4, 256, False, False, False, 128, 0),
    (12, 512, 3, 256, True, True, True, 64, 0),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "r{}c{}b{}g{}{}{}{}blk{}mz{}".format(
        c[0],
        c[1],
        c[2],
        c[3],
        "sym" if c[4] else "asym",
        "-act" if c[5] else "",
        "-static" if c[6] else "",
        c[7],
        c[8],
    ),
)
def test_fast_solver_equals_oracle(case: tuple[int, ...]) -> None:
    rows, cols, bits, group, sym, act, static, block, min_zero = case
    scheme = QuantScheme(bits=bits, group_size=group, sym=bool(sym), min_zero=min_zero)
    options = GPTQOptions(act_order=bool(act), static_groups=bool(static), block_size=block)
    for dtype in (torch.float64, torch.float32):
        w, h = _problem(rows, cols, seed=sum(case), dtype=dtype)
        fast = solve_gptq(w, h, scheme, options)
        oracle = solve_gptq_reference(w, h, scheme, options)
        mismatch = (fast.weight.codes != oracle.weight.codes).float().mean().item()
        # float64 leaves no room for ties; float32 summation order may flip an exact half-step.
        assert mismatch <= (0.0 if dtype == torch.float64 else 1e-3), f"{dtype}: {mismatch:.2%} codes differ"
        assert fast.error == pytest.approx(oracle.error, rel=1e-4)
        assert torch.equal(fast.weight.g_idx, oracle.weight.g_idx)
        torch.testing.assert_close(fast.weight.scales, oracle.weight.scales, rtol=1e-5, atol=1e-7)
        assert fast.error < fast.rtn_error, "GPTQ must beat round-to-nearest on its own objective"
        assert fast.damp_percent == pytest.approx(0.01)
        codes = fast.weight.codes
        assert codes.dtype == torch.uint8 and int(codes.max()) <= scheme.maxq
        if not sym:
            assert int(fast.weight.zeros.min()) >= min_zero


def test_error_is_hessian_weighted_distance() -> None:
    w, h = _problem(16, 128, seed=1)
    result = solve_gptq(w, h, QuantScheme(bits=4, group_size=32), GPTQOptions())
    delta = w - result.weight.dequantize(torch.float64)
    assert result.error == pytest.approx(float(torch.trace(delta @ h @ delta.T)), rel=1e-9)


def test_act_order_groups_follow_processing_order() -> None:
    w, h = _problem(8, 256, seed=2)
    scheme = QuantScheme(bits=4, group_size=64)
    result = solve_gptq(w, h, scheme, GPTQOptions(act_order=True, static_groups=False))
    perm = torch.argsort(torch.diagonal(h), descending=True)
    expected = torch.empty(256, dtype=torch.long)
    expected[perm] = torch.arange(256) // 64
    assert torch.equal(result.weight.g_idx.long(), expected)
    assert torch.bincount(result.weight.g_idx.long()).tolist() == [64] * 4
    static = solve_gptq(w, h, scheme, GPTQOptions(act_order=True, static_groups=True))
    assert torch.equal(static.weight.g_idx.long(), torch.arange(256) // 64)


def test_concatenated_rows_equal_separate_solves() -> None:
    """One factorization, many rows: q/k/v solved together give exactly what separate solves give."""
    w, h = _problem(48, 128, seed=3)
    scheme, options = QuantScheme(bits=3, group_size=32), GPTQOptions(act_order=True)
    parts = split_rows(solve_gptq(w, h, scheme, options), [32, 8, 8])
    for part, rows in zip(parts, (slice(0, 32), slice(32, 40), slice(40, 48)), strict=True):
        alone = solve_gptq(w[rows], h, scheme, options)
        assert torch.equal(part.weight.codes, alone.weight.codes)
        assert torch.equal(part.weight.zeros, alone.weight.zeros)
        assert part.error == pytest.approx(alone.error, rel=1e-9)
        assert part.rtn_error == pytest.approx(alone.rtn_error, rel=1e-9)
    with pytest.raises(ConfigError, match="add up"):
        split_rows(solve_gptq(w, h, scheme, options), [10, 10])


def test_dead_inputs_are_zeroed() -> None:
    w, h = _problem(8, 64, seed=4)
    h[5, :] = 0
    h[:, 5] = 0
    result = solve_gptq(w, h, QuantScheme(bits=4, group_size=32), GPTQOptions())
    assert torch.all(result.weight.dequantize()[:, 5] == 0)
    assert result.error == pytest.approx(
        solve_gptq_reference(w, h, QuantScheme(bits=4, group_size=32), GPTQOptions()).error, rel=1e-9
    )


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_error_identities_equal_the_hessian_product(act_order: bool) -> None:
    """The CUDA error paths, run here in float64: through the factor, and from the loop's scaled errors
    E (ΔW' = E·U for the prepared weight's change ΔW'), both give ΔW·H·ΔWᵀ per row, with dead inputs
    that count nothing although the loop's ΔW' is -Q there (the prepared weight is zero)."""
    w, h = _problem(12, 96, seed=10)
    dead = [5, 40, 41]
    h[dead, :] = 0
    h[:, dead] = 0
    prepared = prepare(w, h, QuantScheme(bits=4, group_size=32), GPTQOptions(act_order=act_order))
    q = torch.round(w * 4) / 4 + 0.1  # a dequantized weight, nonzero on the dead inputs
    exact = hessian_row_errors(w - q, h)
    torch.testing.assert_close(factor_row_errors(w - q, prepared), exact, rtol=1e-9, atol=0)
    changed = w.masked_fill(prepared.dead, 0.0) - q
    if prepared.perm is not None:
        changed = changed[:, prepared.perm]
    scaled = changed @ prepared.factor  # E = ΔW'·R
    torch.testing.assert_close(loop_row_errors(row_squares(scaled), w, q, prepared), exact, rtol=1e-9, atol=0)
    torch.testing.assert_close(row_squares(w.float(), chunk=7 * 96 + 5), w.float().double().square().sum(1))


def test_indefinite_hessian_escalates_damping() -> None:
    w, h = _problem(8, 64, seed=5)
    eigvals, eigvecs = torch.linalg.eigh(h)
    mean_diag = float(torch.diagonal(h).mean())
    # One eigenvalue pushed to -5% of the mean diagonal: 1% damping cannot fix it, 10% can.
    eigvals[0] = -0.05 * mean_diag
    bad = eigvecs @ torch.diag(eigvals) @ eigvecs.T
    result = solve_gptq(w, bad, QuantScheme(bits=4, group_size=32), GPTQOptions(), name="model.layers.0.x")
    assert result.damp_percent == pytest.approx(0.1)
    with pytest.raises(SolverError, match=r"model\.layers\.0\.x: Hessian is not positive definite"):
        solve_gptq(
            w,
            bad,
            QuantScheme(bits=4, group_size=32),
            GPTQOptions(max_damp_percent=0.05),
            name="model.layers.0.x",
        )
    _, damp = hessian_factor(h, GPTQOptions())
    assert damp == pytest.approx(0.01)


def test_singular_hessian_is_solved_with_base_damping() -> None:
    w, _ = _problem(8, 64, seed=6)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rank_16 = 2 * x.T @ x / 16
    result = solve_gptq(w, rank_16, QuantScheme(bits=4, group_size=32), GPTQOptions())
    assert result.damp_percent == pytest.approx(0.01) and result.error < result.rtn_error


def test_bad_inputs() -> None:
    w, h = _problem(8, 64, seed=7)
    scheme, options = QuantScheme(bits=4, group_size=32), GPTQOptions()
    nan_h = h.clone()
    nan_h[3, 4] = float("nan")
    with pytest.raises(SolverError, match="k_proj: Hessian contains NaN"):
        solve_gptq(w, nan_h, scheme, options, name="k_proj")
    nan_w = w.clone()
    nan_w[0, 0] = float("inf")
    with pytest.raises(SolverError, match="k_proj: weight contains NaN"):
        solve_gptq(nan_w, h, scheme, options, name="k_proj")
    with pytest.raises(ConfigError, match=r"down_proj: group_size 48 does not divide in_features 64"):
        solve_gptq(w, h, QuantScheme(group_size=48), options, name="down_proj")
    with pytest.raises(ConfigError, match=r"expected \(64, 64\)"):
        solve_gptq(w, h[:32, :32], scheme, options)
    with pytest.raises(CalibrationError, match="needs a Hessian"):
        get_method(Method.GPTQ).solve(w, None, scheme, options, "q_proj")


def test_registry_dispatches_gptq() -> None:
    w, h = _problem(8, 64, seed=8)
    scheme, options = QuantScheme(bits=4, group_size=32), GPTQOptions()
    via = get_method(Method.GPTQ).solve(w, h, scheme, options, "x")
    assert torch.equal(via.weight.codes, solve_gptq(w, h, scheme, options).weight.codes)


def test_grid_search_matches_oracle_and_lowers_error() -> None:
    w, h = _problem(16, 128, seed=9)
    scheme, options = QuantScheme(bits=3, group_size=32), GPTQOptions(act_order=True)
    search = GridSearch(steps=25)
    fast = solve_gptq(w, h, scheme, options, search=search)
    oracle = solve_gptq_reference(w, h, scheme, options, search=search)
    assert torch.equal(fast.weight.codes, oracle.weight.codes)
    assert fast.error == pytest.approx(oracle.error, rel=1e-4)
    assert fast.error < solve_gptq(w, h, scheme, options).error
    via = get_method(Method.GPTQ).solve(w, h, scheme, replace(options, grid_search=search), "x")
    assert torch.equal(via.weight.codes, fast.weight.codes)


def test_factor_and_its_diagonal_inverses() -> None:
    """R·Rᵀ is the damped Hessian, R is upper triangular, and each span's tile inverse is that tile of
    the whole R⁻¹ (spans: one per block, one per group wider than a block, blocks for a whole-row
    group)."""
    assert column_spans(640, 128, 64) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 640)]
    assert column_spans(1024, 128, 256) == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert column_spans(300, 128, 300) == [(0, 128), (128, 256), (256, 300)]
    _, h = _problem(1, 300, seed=13)
    r, damp = hessian_factor(h, GPTQOptions())
    damped = h + damp * torch.diagonal(h).mean() * torch.eye(300, dtype=h.dtype)
    torch.testing.assert_close(r @ r.T, damped, rtol=1e-12, atol=1e-12 * float(damped.abs().max()))
    assert torch.equal(r, r.triu())
    u = invert_upper_(r.clone())
    spans = column_spans(300, 128, 300)
    for (start, stop), tile in zip(spans, diagonal_inverses(r, spans), strict=True):
        torch.testing.assert_close(tile, u[start:stop, start:stop], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("scheme", "options"),
    [
        (QuantScheme(bits=4, group_size=32), GPTQOptions(block_size=64)),
        (QuantScheme(bits=3, group_size=256, sym=True), GPTQOptions(act_order=True, block_size=64)),
        (QuantScheme(bits=4, group_size=64), GPTQOptions(act_order=True, static_groups=True)),
        (GGMLScheme(type=GGMLType.Q4_K), GPTQOptions()),
    ],
    ids=["g32", "g256-act", "g64-static", "q4_k"],
)
def test_row_shards_give_the_unsharded_solve(
    scheme: Scheme, options: GPTQOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards of rows on several devices (here the CPU, repeated) are one solve: the same codes and
    grids bit for bit in float32, and the same per-row errors. Row tiles of 64 rows (products over
    6 of them or fewer) keep the problem small enough for the CPU."""
    monkeypatch.setattr(gptq, "ROW_TILE", 64)
    w, h = _problem(320, 512, seed=14, dtype=torch.float32)
    whole = solve_gptq(w, h, scheme, options)
    for devices in (["cpu", "cpu"], ["cpu"] * 3):  # shards of 128 + 192 rows, then 64 + 128 + 128
        sharded = solve_gptq(w, h, scheme, options, devices=devices)
        if isinstance(whole.weight, GGMLWeight):
            assert isinstance(sharded.weight, GGMLWeight)
            assert torch.equal(sharded.weight.data, whole.weight.data)
        else:
            assert isinstance(sharded.weight, QuantizedWeight) and isinstance(whole.weight, QuantizedWeight)
            for part in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(sharded.weight, part), getattr(whole.weight, part)), part
        torch.testing.assert_close(sharded.row_errors, whole.row_errors, rtol=1e-9, atol=0)
        torch.testing.assert_close(sharded.rtn_row_errors, whole.rtn_row_errors, rtol=1e-9, atol=0)
        assert sharded.error == pytest.approx(whole.error, rel=1e-12)


def test_shard_bounds_cut_at_row_multiples() -> None:
    """Whole tiles dealt out evenly, a short last tile with the last shard, none shorter than a tile,
    fewer shards for short layers."""
    assert shard_bounds(8192, 2, 4096) == [0, 4096, 8192]
    assert shard_bounds(10240, 2, 4096) == [0, 4096, 10240]
    assert shard_bounds(8192, 4, 2048) == [0, 2048, 4096, 6144, 8192]
    assert shard_bounds(8192, 3, 64) == [0, 2688, 5440, 8192]
    assert shard_bounds(300, 3, 64) == [0, 64, 192, 300]
    assert shard_bounds(100, 4, 64) == [0, 100]
    assert shard_bounds(1024, 1, 64) == [0, 1024]
    assert shard_bounds(0, 2, 64) == [0, 0]


def test_asymmetric_target_is_the_least_squares_fit_of_the_float_outputs() -> None:
    """W* maps the quantized stream's inputs X̃ onto the float outputs W·X as well as any linear map can
    (up to the ridge), and is W itself when the streams agree, whatever the ridge and the rank of H."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    x_tilde = x + 0.1 * torch.randn(512, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    hessian, cross = 2 * x_tilde.T @ x_tilde / 512, 2 * x_tilde.T @ x / 512
    best = torch.linalg.lstsq(x_tilde, x @ w.T).solution.T
    assert torch.allclose(asymmetric_target(w, hessian, cross, 1e-12), best, atol=1e-8)
    few = x[:8]  # rank 8 of 16: the ridge alone decides W* off the calibration's span
    same = asymmetric_target(w, 2 * few.T @ few / 8, 2 * few.T @ few / 8, 0.01)
    assert torch.allclose(same, w, atol=1e-10)
