"""The safetensors weights of a checkpoint whose quantized linears are stored as packed tensors.

Why shared: GPTQ, AWQ, compressed-tensors and ModelOpt checkpoints (any HF-style layout that replaces
`<linear>.weight` by a few packed tensors) are written the same way, and only the packing differs. Every
source tensor keeps its name and dtype (or takes its `dense` replacement, see
`bitsmith.formats.base.Writer`); each quantized linear's `.weight` becomes what the format's `pack` makes
of it and its `.bias` becomes `bias_dtype` (float16 by default, what GPTQ and AWQ kernels read; None
keeps the source's dtype); past `max_shard_bytes` the tensors go to ``model-0000i-of-0000n.safetensors``
shards plus an index. Sizes are planned from headers and `packed_nbytes` before anything is packed, so
one shard at a time is materialised, written atomically and dropped. Callers validate their inputs
before calling this.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, TypeVar

import torch

from bitsmith.formats.base import save_safetensors_atomic, write_file_atomic
from bitsmith.formats.safetensors_io import (
    INDEX_FILE,
    PT_METADATA,
    SHARD_TEMPLATE,
    WEIGHTS_FILE,
    TensorInfo,
    load_tensors,
)

WEIGHT = "weight"
BIAS = "bias"

W = TypeVar("W")
"""What a format packs one linear from: its solved weight, or that with the format's own choices for it."""


@dataclass(frozen=True, slots=True)
class _Item:
    """One planned output: a source tensor to copy (a quantized linear's bias is cast) or a layer to pack."""

    name: str
    nbytes: int
    source: TensorInfo | None = None
    layer: str | None = None


def _plan(
    source: Mapping[str, TensorInfo],
    quantized: Mapping[str, W],
    packed_nbytes: Callable[[W], int],
    bias_dtype: torch.dtype | None,
) -> list[_Item]:
    items: list[_Item] = []
    for tensor_name in sorted(source):
        info = source[tensor_name]
        prefix, _, suffix = tensor_name.rpartition(".")
        if prefix in quantized and suffix == WEIGHT:
            items.append(_Item(prefix, packed_nbytes(quantized[prefix]), layer=prefix))
        elif prefix in quantized and suffix == BIAS and bias_dtype is not None:
            items.append(_Item(tensor_name, bias_dtype.itemsize * prod(info.shape), source=info))
        else:
            items.append(_Item(tensor_name, info.nbytes, source=info))
    return items


def _shards(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _materialize(
    items: list[_Item],
    quantized: Mapping[str, W],
    pack: Callable[[W], Mapping[str, torch.Tensor]],
    dense: Mapping[str, torch.Tensor] | None,
    bias_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    loaded = load_tensors((item.source for item in items if item.source is not None), dense)
    tensors: dict[str, torch.Tensor] = {}
    for item in items:
        if item.layer is not None:
            tensors.update({f"{item.layer}.{suffix}": t for suffix, t in pack(quantized[item.layer]).items()})
        elif bias_dtype is not None and item.name.rpartition(".")[0] in quantized:
            tensors[item.name] = loaded[item.name].to(bias_dtype)
        else:
            tensors[item.name] = loaded[item.name]
    return tensors


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Pretty, key-sorted JSON written atomically (configs, indexes)."""
    return write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_packed_weights(
    out_dir: Path,
    *,
    source: Mapping[str, TensorInfo],
    quantized: Mapping[str, W],
    pack: Callable[[W], Mapping[str, torch.Tensor]],
    packed_nbytes: Callable[[W], int],
    dense: Mapping[str, torch.Tensor] | None,
    max_shard_bytes: int,
    bias_dtype: torch.dtype | None = torch.float16,
) -> dict[str, str]:
    """Write the weight file(s) into `out_dir` (see the module docstring); returns tensor name → file.

    `quantized` maps each quantized linear to what `pack` (its tensors, keyed by suffix: ``qweight``, …)
    and `packed_nbytes` (their size, to plan shards) take.
    """
    shards = _shards(_plan(source, quantized, packed_nbytes, bias_dtype), max_shard_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, items in enumerate(shards, start=1):
        file = WEIGHTS_FILE if len(shards) == 1 else SHARD_TEMPLATE.format(index=index, total=len(shards))
        tensors = _materialize(items, quantized, pack, dense, bias_dtype)
        save_safetensors_atomic(out_dir / file, tensors, PT_METADATA)
        weight_map.update(dict.fromkeys(tensors, file))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    return weight_map
