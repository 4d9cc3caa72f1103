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
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not files:
        raise ConfigError("no calibration files given")
    tokenizer = _load_tokenizer(tokenizer_dir)
    generator = torch.Generator().manual_seed(seed)
    windows: list[torch.Tensor] = []
    for path, count in zip(files, samples_per_file(samples, len(files)), strict=True):
        stream = _encode(tokenizer, Path(path))
        if stream.numel() < seq_len:
            raise CalibrationError(f"{path} has {stream.numel()} tokens, fewer than seq_len {seq_len}")
        starts = torch.randint(0, stream.numel() - seq_len + 1, (count,), generator=generator)
        windows.extend(stream[start : start + seq_len] for start in starts.tolist())
    return torch.stack(windows)
