"""What the format tests share: reading an artifact's tensors and quantization config, damaging a copy of
one, and the two refusal checks every format makes — its writer refuses before it writes a byte, its reader
refuses a damaged copy of a good artifact."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


def all_tensors(path: Path) -> Tensors:
    """Every tensor of the artifact at `path`, across its shards."""
    out: Tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def qconfig(path: Path) -> dict[str, Any]:
    """config.json's `quantization_config`."""
    return json.loads((path / "config.json").read_text())["quantization_config"]


def damage_tensors(change: Callable[[Tensors], object], file: str = "model.safetensors") -> Callable[[Path], None]:
    """A damage: rewrite the weights `file` of an artifact after `change` edited its tensors in place."""

    def damage(path: Path) -> None:
        tensors = load_file(path / file)
        change(tensors)
        save_file(tensors, str(path / file), metadata={"format": "pt"})

    return damage


def assert_writer_refuses(out: Path, write: Callable[[Path], object], error: type[Exception], match: str) -> None:
    """`write(out)` raises `error` matching `match`, and leaves `out` empty."""
    with pytest.raises(error, match=match):
        write(out)
    assert not any(out.iterdir())


def assert_reader_refuses(
    artifact: Path,
    tmp_path: Path,
    damage: Callable[[Path], object],
    read: Callable[[Path], object],
    error: type[Exception],
    match: str,
) -> None:
    """`read` refuses (`error` matching `match`) a copy of `artifact` that `damage` changed."""
    path = tmp_path / "copy"
    shutil.copytree(artifact, path)
    damage(path)
    with pytest.raises(error, match=match):
        read(path)
