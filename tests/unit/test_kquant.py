"""ggml block types: decoding against gguf-py, encoding against llama.cpp, and GPTQ on their grids."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsmith.algos import get_method, kquant, solve_gptq, split_rows
from bitsmith.algos.gptq import hessian_row_errors, invert_upper_, prepare
from bitsmith.algos.grid import dequantize, quantize
from bitsmith.algos.kquant_gptq import GGMLTracker
from bitsmith.errors import CalibrationError, ConfigError, SolverError
from bitsmith.kernels import KernelPreference, select
from bitsmith.kernels.gptq_block import solve_block_reference
from bitsmith.quantized import GGMLWeight
from bitsmith.schemes import GGMLScheme, GGMLType, GPTQOptions, Method

gguf = pytest.importorskip("gguf")

QUANTIZED = list(kquant.LAYOUTS)
K_QUANTS = [t for t in QUANTIZED if t.block_size == 256]
LEGACY = [t for t in QUANTIZED if t.block_size == 32]


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows with uneven column scales, one all-zero super-block, one all-positive block
    and one near-flat sub-block (whose quantized scale rounds to 0)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(1, cols, generator=gen).mul(2).add(0.1)
    w[1, :256] = 0
    w[2, :32] = w[2, :32].abs()
    w[3, 16:48] *= 1e-3
    return w


def _worst_blocks(got: np.ndarray, expected: np.ndarray, type: GGMLType) -> str:
    """Which blocks differ (row, block), for a failure message."""
    blocks = (got.reshape(got.shape[0], -1, type.type_size) != expected.reshape(got.shape[0], -1, type.type_size))
    bad = np.argwhere(blocks.any(-1))
    return f"{len(bad)} of {blocks.shape[0] * blocks.shape[1]} blocks differ, first (row, block): {bad[:5].tolist()}"


# ------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("type", [*QUANTIZED, GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=str)
def test_dequantize_equals_gguf_on_random_bytes(type: GGMLType) -> None:
    data = np.random.default_rng(7).integers(0, 256, size=(6, type.row_bytes(512)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type.value]).reshape(6, 512)
    got = kquant.dequantize(torch.from_numpy(data), type, 512).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, expected, equal_nan=True), f"max |diff| {np.nanmax(np.abs(got - expected))}"


@pytest.mark.parametrize("type", QUANTIZED, ids=str)
def test_unpack_then_pack_gives_back_every_byte(type: GGMLType) -> None:
    data = torch.from_numpy(np.random.default_rng(8).integers(0, 256, size=(3, type.row_bytes(512)), dtype=np.uint8))
    assert torch.equal(kquant.pack(kquant.unpack(data, type, 512), type), data)


def test_dequantize_refuses_data_of_the_wrong_shape() -> None:
    from bitsmith.errors import FormatError

    with pytest.raises(FormatError, match="Q4_K rows of 512 weights are uint8 \\[rows, 288\\]"):
        kquant.dequantize(torch.zeros(2, 287, dtype=torch.uint8), GGMLType.Q4_K, 512)


# ------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("type", LEGACY, ids=str)
def test_legacy_quantize_equals_gguf(type: GGMLType) -> None:
    w = _weights(8, 512, seed=1)
    expected = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[type.value])
    got = kquant.quantize(w, type).data.numpy()
    assert np.array_equal(got, expected), _worst_blocks(got, expected, type)


def _libggml() -> ctypes.CDLL | None:
    """llama.cpp's ggml library as llama-cpp-python ships it, or None where it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "lib").glob("*ggml-base.*"))
    if not found:
        return None
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("type", QUANTIZED, ids=str)
def test_quantize_equals_llama_cpp_byte_for_byte(type: GGMLType, with_importance: bool) -> None:
    lib = _libggml()
    if lib is None:
        pytest.skip("llama-cpp-python (libggml) is not installed")
    w = _weights(12, 512, seed=2)
    importance = torch.rand(512, generator=torch.Generator().manual_seed(3)) ** 2 if with_importance else None
    src = np.ascontiguousarray(w.numpy())
    imatrix = None if importance is None else np.ascontiguousarray(importance.numpy())
    expected = np.zeros((12, type.row_bytes(512)), dtype=np.uint8)
    lib.ggml_quantize_chunk(type.ggml_id, src.ctypes.data, expected.ctypes.data, 0, 12, 512,
                            None if imatrix is None else imatrix.ctypes.data)
    got = kquant.quantize(w, type, importance).data.numpy()
    assert np.array_equal(got, expected), _worst_blocks(got, expected, type)


def _rmse(w: torch.Tensor, type: GGMLType) -> float:
    return float((kquant.quantize(w, type).dequantize() - w).pow(2).mean().sqrt())


def test_error_falls_with_bits_and_k_quants_beat_legacy() -> None:
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    ladder = [_rmse(w, t) for t in (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                                    GGMLType.Q8_0)]
    assert ladder == sorted(ladder, reverse=True), ladder
    assert ladder[2] < 0.1 and ladder[-1] < 0.01, ladder
    assert _rmse(w, GGMLType.Q4_K) < 0.9 * _rmse(w, GGMLType.Q4_0)
    assert _rmse(w, GGMLType.Q5_K) < _rmse(w, GGMLType.Q5_0)


@pytest.mark.parametrize("type", [t for t in QUANTIZED if t is not GGMLType.Q8_0], ids=str)
def test_importance_lowers_the_error_it_weighs(type: GGMLType) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 512, generator=gen)
    importance = torch.rand(512, generator=gen).pow(4).mul(100)

    def weighted(q: torch.Tensor) -> float:
        return float(((q - w) ** 2 * importance).sum())

    plain = weighted(kquant.quantize(w, type).dequantize())
    informed = weighted(kquant.quantize(w, type, importance).dequantize())
    assert informed < plain


@pytest.mark.parametrize("type", QUANTIZED, ids=str)
def test_zero_and_constant_rows_come_back_exactly(type: GGMLType) -> None:
    w = torch.zeros(3, 256)
    w[1] = 0.5
    w[2] = -0.25
    for importance in (None, torch.ones(256)):
        q = kquant.quantize(w, type, importance).dequantize()
        assert torch.isfinite(q).all()
        assert torch.equal(q[0], w[0])
        assert torch.allclose(q, w, atol=0.02 * 0.5 if type is not GGMLType.Q2_K else 0.1)


def test_quantize_refuses_bad_input_naming_the_layer() -> None:
    with pytest.raises(ConfigError, match=r"layer\.q: Q4_K needs rows of a multiple of 256 weights, got 96"):
        kquant.quantize(torch.zeros(2, 96), GGMLType.Q4_K, name="layer.q")
    with pytest.raises(ConfigError, match="F16 is a float type"):
        kquant.quantize(torch.zeros(2, 32), GGMLType.F16)
    with pytest.raises(SolverError, match=r"layer\.q: weight contains NaN"):
        kquant.quantize(torch.full((2, 32), float("nan")), GGMLType.Q8_0, name="layer.q")
    with pytest.raises(ConfigError, match=r"importance has shape \(3,\), expected \(32,\)"):
        kquant.quantize(torch.zeros(2, 32), GGMLType.Q4_0, torch.ones(3))


# ----------------------------------------------------------------------------------------------- GPTQ


def _problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with degenerate blocks and a correlated, unevenly scaled Hessian."""
    w = _weights(rows, cols, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(4 * cols, cols, generator=gen) @ mix * torch.rand(cols, generator=gen).mul(3).add(0.1)
    return w, 2 * x.T @ x / x.shape[0]


def _cols(type: GGMLType) -> int:
    return 512 if type in K_QUANTS else 256


@pytest.mark.parametrize("importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("type", QUANTIZED, ids=str)
def test_gptq_beats_llama_cpp_rounding_and_reports_true_errors(type: GGMLType, importance: bool) -> None:
    w, h = _problem(8, _cols(type), seed=6)
    scheme = GGMLScheme(type=type, importance=importance)
    result = solve_gptq(w, h, scheme, GPTQOptions(block_size=64))
    assert result.weight.scheme == scheme and result.weight.shape == tuple(w.shape)
    got = result.weight.dequantize()
    assert torch.isfinite(got).all()
    assert result.error == pytest.approx(float(hessian_row_errors(w - got, h).sum()), rel=1e-9)
    rtn = kquant.quantize(w, type, torch.diagonal(h) if importance else None).dequantize()
    assert result.rtn_error == pytest.approx(float(hessian_row_errors(w - rtn, h).sum()), rel=1e-9)
    assert result.error < 0.9 * result.rtn_error


@pytest.mark.parametrize("block_size", [64, 128, 256], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_1], ids=str)
def test_gptq_on_ggml_grids_equals_the_column_loop(type: GGMLType, block_size: int) -> None:
    """The blocked solver (super-blocks wider than its blocks, R's diagonal tiles, spans brought up to
    date through R) against GPTQ column by column through the whole U = R⁻¹, on the same tracker:
    in float64 every byte must agree, the ggml shift at each block start included."""
    w, h = _problem(6, 768 if type in K_QUANTS else 256, seed=12)
    w, h = w.double(), h.double()
    scheme, options = GGMLScheme(type=type), GPTQOptions(block_size=block_size)
    fast = solve_gptq(w, h, scheme, options)
    prepared = prepare(w, h, scheme, options)
    tracker = GGMLTracker(prepared, scheme, h)
    x, u = prepared.weight, invert_upper_(prepared.factor.clone())
    codes = torch.zeros_like(x)
    for begin, end in tracker.runs(0, x.shape[1]):
        scales, zeros, sel = tracker.run_grids(begin, end, x[:, begin:])
        for column, grid in zip(range(begin, end), sel.tolist(), strict=True):
            q = quantize(x[:, column : column + 1], scales[:, grid], zeros[:, grid], tracker.maxq)
            codes[:, column] = q[:, 0]
            err = (x[:, column] - dequantize(q, scales[:, grid], zeros[:, grid])[:, 0]) / u[column, column]
            x[:, column:] -= torch.outer(err, u[column, column:])
    loop = tracker.finish(codes, w, h)
    assert isinstance(fast.weight, GGMLWeight) and isinstance(loop.weight, GGMLWeight)
    assert torch.equal(fast.weight.data, loop.weight.data)
    assert fast.error == pytest.approx(loop.error, rel=1e-9)


@pytest.mark.parametrize("type", K_QUANTS, ids=str)
def test_gptq_with_a_diagonal_hessian_is_llama_cpp_rounding(type: GGMLType) -> None:
    """With H = c·I no error is pushed anywhere, so GPTQ must round every weight exactly as
    llama.cpp's K-quant quantizers finish (nearest code on the fp16-derived grids): this pins the
    fit, the grid tables, the offset trick for min and flat sub-blocks, and the packing at once."""
    w = _weights(6, 512, seed=9)
    for importance in (False, True):
        result = solve_gptq(w, 3 * torch.eye(512), GGMLScheme(type=type, importance=importance), GPTQOptions())
        expected = kquant.quantize(w, type, torch.full((512,), 3.0) if importance else None)
        assert torch.equal(result.weight.dequantize(), expected.dequantize())
        assert result.error == result.rtn_error


@pytest.mark.parametrize("type", [GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q4_1, GGMLType.Q8_0], ids=str)
def test_bytes_hold_exactly_what_the_loop_rounded_to(type: GGMLType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record each run's grid tables, the shift the tracker adds to the block, and the codes the
    block solver writes; the result's bytes must carry those codes and decode to scale·(code - zero)
    minus that shift (equal up to the rounding of the shift's addition). Column order, where each
    block is fit as the solve reaches it (the ordered solve's grids are pinned by the test below)."""
    w, h = _problem(6, _cols(type), seed=10)
    runs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    shifts = torch.zeros_like(w)
    codes_seen = torch.full(w.shape, -1.0)
    fit_runs = GGMLTracker.run_grids

    def recording_run_grids(
        self: GGMLTracker, begin: int, end: int, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        before = current[:, : type.block_size].clone()
        tables = fit_runs(self, begin, end, current)
        if begin % type.block_size == 0:
            shifts[:, begin : begin + type.block_size] = current[:, : type.block_size] - before
        runs.append((begin, *tables))
        return tables

    def recording_solver(*args: object) -> None:
        solve_block_reference(*args)  # type: ignore[arg-type]
        codes, begin, end = args[5], args[7], args[8]
        assert isinstance(codes, torch.Tensor) and isinstance(begin, int) and isinstance(end, int)
        first = runs[-1][0]
        codes_seen[:, first : first + end - begin] = codes[:, begin:end]

    monkeypatch.setattr(GGMLTracker, "run_grids", recording_run_grids)
    monkeypatch.setattr(select, "solve_block_reference", recording_solver)
    result = solve_gptq(w, h, GGMLScheme(type=type), GPTQOptions(block_size=64, act_order=False, static_groups=False),
                        kernels=KernelPreference.REFERENCE)
    assert isinstance(result.weight, GGMLWeight)
    blocks = kquant.unpack(result.weight.data, type, w.shape[1])
    assert torch.equal(blocks.codes.float(), codes_seen)
    loop_values = torch.empty_like(w)
    for begin, scales, zeros, sel in runs:
        cols = slice(begin, begin + len(sel))
        on_grid = scales[:, sel.long()] * (codes_seen[:, cols] - zeros[:, sel.long()])
        loop_values[:, cols] = on_grid - shifts[:, cols]
    decoded = result.weight.dequantize()
    assert torch.allclose(decoded, loop_values, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_gptq_on_ggml_grids_orders_columns_only_on_grids_fit_before_the_solve_and_refuses_bad_shapes() -> None:
    """A ggml row records no column order. Activation ordering with static groups (the default) fits every
    block to the checkpoint's weights first, exactly as llama.cpp's rounding would, then solves columns by
    decreasing Hessian diagonal; without static groups the solve stays in column order."""
    for type in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0):
        w, h = _problem(6, 512, seed=11)
        scheme = GGMLScheme(type=type, importance=True)
        plain = solve_gptq(w, h, scheme, GPTQOptions(act_order=False, static_groups=False))
        unordered = solve_gptq(w, h, scheme, GPTQOptions(act_order=True, static_groups=False))
        assert torch.equal(unordered.weight.data, plain.weight.data) and unordered.error == plain.error
        ordered = solve_gptq(w, h, scheme, GPTQOptions())
        assert isinstance(ordered.weight, GGMLWeight)
        blocks = kquant.unpack(ordered.weight.data, type, w.shape[1])
        rounded = kquant.unpack(kquant.quantize(w, type, torch.diagonal(h)).data, type, w.shape[1])
        for field in ("d", "dmin", "scales", "mins"):  # the grids of llama.cpp's rounding, codes of GPTQ's
            assert torch.equal(getattr(blocks, field), getattr(rounded, field)), (type, field)
        assert not torch.equal(blocks.codes, rounded.codes)
        assert ordered.error < ordered.rtn_error
        assert ordered.error == pytest.approx(float(hessian_row_errors(w - ordered.weight.dequantize(), h).sum()),
                                              rel=1e-6)
    with pytest.raises(ConfigError, match=r"blk\.0\.q: Q4_K needs rows of a multiple of 256 weights, got 128"):
        solve_gptq(w[:, :128], h[:128, :128], GGMLScheme(type=GGMLType.Q4_K), GPTQOptions(), name="blk.0.q")


def test_split_rows_cuts_a_ggml_result_exactly() -> None:
    w, h = _problem(10, 256, seed=12)
    whole = solve_gptq(w, h, GGMLScheme(type=GGMLType.Q6_K), GPTQOptions())
    parts = split_rows(whole, [4, 6])
    assert torch.equal(torch.cat([p.weight.dequantize() for p in parts]), whole.weight.dequantize())
    assert sum(p.error for p in parts) == pytest.approx(whole.error, rel=1e-12)


def test_methods_dispatch_on_the_scheme_type() -> None:
    w, h = _problem(4, 256, seed=13)
    scheme = GGMLScheme(type=GGMLType.Q4_K)
    options = GPTQOptions()
    rtn = get_method(Method.RTN).solve(w, h, scheme, options, "blk.0.q")
    expected = kquant.quantize(w, GGMLType.Q4_K, torch.diagonal(h))
    assert isinstance(rtn.weight, GGMLWeight) and torch.equal(rtn.weight.data, expected.data)
    assert rtn.error == pytest.approx(float(hessian_row_errors(w - expected.dequantize(), h).sum()))
    awq = get_method(Method.AWQ).solve(w, h, scheme, options, "blk.0.q")
    assert isinstance(awq.weight, GGMLWeight) and torch.equal(awq.weight.data, expected.data)
    blind = get_method(Method.RTN).solve(w, None, scheme, options, "blk.0.q")
    assert isinstance(blind.weight, GGMLWeight)
    assert torch.equal(blind.weight.data, kquant.quantize(w, GGMLType.Q4_K).data) and np.isnan(blind.error)
    plain = get_method(Method.RTN).solve(w, h, GGMLScheme(type=GGMLType.Q4_K, importance=False), options, "q")
    assert isinstance(plain.weight, GGMLWeight)
    assert torch.equal(plain.weight.data, kquant.quantize(w, GGMLType.Q4_K).data)
    gptq = get_method(Method.AWQ_GPTQ).solve(w, h, scheme, options, "blk.0.q")
    assert gptq.error < gptq.rtn_error == pytest.approx(rtn.error)
    with pytest.raises(CalibrationError, match=r"blk\.0\.q: GPTQ needs a Hessian"):
        get_method(Method.GPTQ).solve(w, None, scheme, options, "blk.0.q")
