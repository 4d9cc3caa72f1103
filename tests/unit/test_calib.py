"""Calibration windows, the Hessian accumulator, and hooked Hessian capture on the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.calib import HessianAccumulator, calibration_tokens, capture_hessians, tokenize_file
from bitsmith.calib.data import _free_offsets, calibration_and_holdout_tokens, default_holdout
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import CalibrationError, ConfigError, NotFoundError


@pytest.fixture(scope="module")
def streams() -> list[torch.Tensor]:
    return [tokenize_file(DEMO_MODEL, path) for path in CALIB_FILES]


def _contains(stream: torch.Tensor, window: torch.Tensor) -> bool:
    starts = (stream[: stream.numel() - window.numel() + 1] == window[0]).nonzero().flatten()
    return any(torch.equal(stream[s : s + window.numel()], window) for s in starts.tolist())


def test_windows_are_reproducible_and_split_evenly(streams: list[torch.Tensor]) -> None:
    tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=5, seq_len=64, seed=7)
    assert tokens.shape == (5, 64) and tokens.dtype == torch.long
    assert torch.equal(tokens, calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=5, seq_len=64, seed=7))
    assert not torch.equal(tokens, calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=5, seq_len=64, seed=8))
    # 5 over 2 files: three windows from the first, two from the second, each a real slice of it.
    for row in range(3):
        assert _contains(streams[0], tokens[row])
    for row in range(3, 5):
        assert _contains(streams[1], tokens[row])


def _starts(stream: torch.Tensor, window: torch.Tensor) -> list[int]:
    starts = (stream[: stream.numel() - window.numel() + 1] == window[0]).nonzero().flatten()
    return [s for s in starts.tolist() if torch.equal(stream[s : s + window.numel()], window)]


def test_held_out_windows_overlap_no_calibration_window(streams: list[torch.Tensor]) -> None:
    calib, held = calibration_and_holdout_tokens(DEMO_MODEL, CALIB_FILES, samples=64, seq_len=512, seed=3,
                                                 holdout=8)
    assert torch.equal(calib, calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=64, seq_len=512, seed=3))
    assert held.shape == (8, 512)
    for stream, rows, held_rows in ((streams[0], calib[:32], held[:4]), (streams[1], calib[32:], held[4:])):
        taken = [s for row in rows for s in _starts(stream, row)]
        for row in held_rows:
            (start,) = _starts(stream, row)
            assert all(abs(start - c) >= 512 for c in taken)
    assert [default_holdout(n) for n in (1, 16, 128, 1024)] == [1, 1, 8, 16]


def test_free_offsets_are_exactly_the_non_overlapping_starts() -> None:
    generator = torch.Generator().manual_seed(0)
    for offsets, length in ((50, 4), (300, 17), (10, 10)):
        taken = torch.randint(0, offsets, (5,), generator=generator)
        expected = [s for s in range(offsets) if all(abs(s - c) >= length for c in taken.tolist())]
        assert _free_offsets(offsets, taken, length).tolist() == expected


def test_no_room_for_held_out_windows_gives_fewer(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text(" ".join(["word"] * 40))
    calib, held = calibration_and_holdout_tokens(DEMO_MODEL, [small], samples=4, seq_len=32, holdout=3)
    assert calib.shape == (4, 32) and held.shape[0] < 3 and held.shape[1:] == (32,)
    with pytest.raises(ConfigError, match="holdout"):
        calibration_and_holdout_tokens(DEMO_MODEL, [small], samples=1, seq_len=8, holdout=-1)


def test_tokenize_adds_no_special_tokens(streams: list[torch.Tensor]) -> None:
    assert streams[0].numel() == 80_694 and streams[1].numel() == 89_034
    assert 0 not in streams[0][:2].tolist()


def test_calibration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=0, seq_len=8)
    with pytest.raises(NotFoundError):
        calibration_tokens(DEMO_MODEL, [tmp_path / "absent.txt"], samples=1, seq_len=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty"):
        calibration_tokens(DEMO_MODEL, [empty], samples=1, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("In the beginning")
    with pytest.raises(CalibrationError, match="fewer than seq_len 512"):
        calibration_tokens(DEMO_MODEL, [short], samples=1, seq_len=512)


def test_hessian_is_two_over_n_xtx_in_any_batching() -> None:
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0))
    whole, parts = HessianAccumulator(16), HessianAccumulator(16)
    whole.add(x)
    for chunk in x.reshape(150, 16).split(7):
        parts.add(chunk)
    flat = x.reshape(150, 16).double()
    expected = (2 / 150 * flat.T @ flat).float()
    assert whole.count == parts.count == 150
    torch.testing.assert_close(whole.hessian(), expected)
    torch.testing.assert_close(parts.hessian(), expected)


def test_hessian_rejects_bad_input() -> None:
    acc = HessianAccumulator(4, name="model.layers.0.mlp.down_proj")
    with pytest.raises(CalibrationError, match="no activations"):
        acc.hessian()
    with pytest.raises(CalibrationError, match="down_proj: activations contain NaN"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(CalibrationError, match="5 columns"):
        acc.add(torch.zeros(2, 5))


def test_capture_matches_manual_activations(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(1))
    hidden = demo_checkpoint.embed(ids)
    captured = capture_hessians(demo_checkpoint, 0, hidden, ["self_attn.q_proj", "mlp.down_proj"], chunk=2)
    assert set(captured) == {"self_attn.q_proj", "mlp.down_proj"}
    stats = captured["self_attn.q_proj"]
    h_q, count, absmax = stats.hessian, stats.tokens, stats.absmax
    assert stats.cross is None
    assert count == 60 and captured["mlp.down_proj"][0].shape == (768, 768)
    layer = demo_checkpoint.block_module(0)
    with torch.no_grad():
        x = layer.input_layernorm(hidden).reshape(60, 256).double()
    torch.testing.assert_close(h_q, (2 / 60 * x.T @ x).float(), rtol=1e-4, atol=1e-5)
    assert absmax == pytest.approx(float(x.abs().max()), rel=1e-6)
    single = capture_hessians(demo_checkpoint, 0, hidden, ["mlp.down_proj"], chunk=3)
    torch.testing.assert_close(single["mlp.down_proj"][0], captured["mlp.down_proj"][0], rtol=1e-4, atol=1e-6)
    assert not layer.self_attn.q_proj._forward_pre_hooks


def test_capture_sees_overrides(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    hidden = demo_checkpoint.embed(torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(2)))
    plain = capture_hessians(demo_checkpoint, 0, hidden, ["self_attn.o_proj"])
    silenced = capture_hessians(
        demo_checkpoint, 0, hidden, ["self_attn.o_proj"], {"self_attn.v_proj.weight": torch.zeros(128, 256)}
    )
    assert plain["self_attn.o_proj"][0].abs().sum() > 0
    assert silenced["self_attn.o_proj"][0].abs().sum() == 0
