"""Calibration and evaluation token streams from plain text files.

Files are tokenized whole, with no special tokens, exactly as the reference models' evaluation
protocol does; calibration windows are drawn at seeded random offsets so a job is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import CalibrationError, ConfigError, FormatError, NotFoundError


def _load_tokenizer(tokenizer_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise NotFoundError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: no usable tokenizer: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"text file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"text file {path} is not readable UTF-8: {exc}") from exc
    if not text:
        raise CalibrationError(f"text file {path} is empty")
    return text


def _encode(tokenizer: Any, path: Path) -> torch.Tensor:
    ids = tokenizer(_read_text(path), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_file(tokenizer_dir: str | Path, path: str | Path) -> torch.Tensor:
    """The whole file as one token stream, LongTensor [T], no special tokens added."""
    return _encode(_load_tokenizer(tokenizer_dir), Path(path))


def samples_per_file(samples: int, files: int) -> list[int]:
    """Split `samples` over `files` as evenly as possible, earlier files taking the remainder."""
    base, extra = divmod(samples, files)
    return [base + (i < extra) for i in range(files)]


def calibration_tokens(
    tokenizer_dir: str | Path, files: Sequence[Path], *, samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, LongTensor [samples, seq_len], drawn evenly from `files`.

    Each file is tokenized whole; its share of windows starts at offsets drawn from one generator
    seeded with `seed`, so the same arguments always give the same tokens.

    >>> from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    >>> calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=3, seq_len=8).shape
    torch.Size([3, 8])
    """
    calibration, _ = calibration_and_holdout_tokens(tokenizer_dir, files, samples=samples, seq_len=seq_len,
                                                    seed=seed, holdout=0)
    return calibration


def default_holdout(samples: int) -> int:
    """Held-out samples a job measures its blocks on when it does not say: samples / 16, in 1..16."""
    return max(1, min(16, samples // 16))


def calibration_and_holdout_tokens(
    tokenizer_dir: str | Path, files: Sequence[Path], *, samples: int, seq_len: int, seed: int = 0, holdout: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows of `calibration_tokens`, unchanged, and `holdout` more windows that
    overlap none of them ([holdout, seq_len], fewer where the files leave no room), for measuring
    the quantized model on text its statistics never saw.

    Held-out windows are drawn after the calibration ones, per file in the same even split, from the
    offsets whose window misses every calibration window of that file.

    >>> from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    >>> calib, held = calibration_and_holdout_tokens(DEMO_MODEL, CALIB_FILES, samples=3, seq_len=8, holdout=2)
    >>> calib.equal(calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=3, seq_len=8)), held.shape
    (True, torch.Size([2, 8]))
    """
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    if holdout < 0:
        raise ConfigError(f"holdout samples must not be negative, got {holdout}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not files:
        raise ConfigError("no calibration files given")
    tokenizer = _load_tokenizer(tokenizer_dir)
    generator = torch.Generator().manual_seed(seed)
    streams = []
    windows: list[torch.Tensor] = []
    for path, count in zip(files, samples_per_file(samples, len(files)), strict=True):
        stream = _encode(tokenizer, Path(path))
        if stream.numel() < seq_len:
            raise CalibrationError(f"{path} has {stream.numel()} tokens, fewer than seq_len {seq_len}")
        starts = torch.randint(0, stream.numel() - seq_len + 1, (count,), generator=generator)
        windows.extend(stream[start : start + seq_len] for start in starts.tolist())
        streams.append((stream, starts))
    held: list[torch.Tensor] = []
    for (stream, taken), count in zip(streams, samples_per_file(holdout, len(files)), strict=True):
        free = _free_offsets(stream.numel() - seq_len + 1, taken, seq_len)
        if count and free.numel():
            picks = free[torch.randperm(free.numel(), generator=generator)[:count]]
            held.extend(stream[start : start + seq_len] for start in picks.tolist())
    return torch.stack(windows), (torch.stack(held) if held else torch.empty(0, seq_len, dtype=torch.long))


def _free_offsets(offsets: int, taken: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Window starts in range(offsets) whose window overlaps none of the windows starting at `taken`
    (a start s is blocked by c when |s - c| < seq_len), in O(offsets + len(taken)) memory."""
    marks = torch.zeros(offsets + 1, dtype=torch.int32)
    marks.index_add_(0, (taken - seq_len + 1).clamp(min=0), torch.ones_like(taken, dtype=torch.int32))
    marks.index_add_(0, (taken + seq_len).clamp(max=offsets), -torch.ones_like(taken, dtype=torch.int32))
    return (marks.cumsum(0)[:offsets] == 0).nonzero().flatten()
