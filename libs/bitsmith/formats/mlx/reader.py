"""Read and validate an MLX quantized checkpoint (FORMATS.md §6, checklist §8).

Checked before anything is loaded: config.json's `quantization` block (one affine scheme bitsmith
can represent, per-module overrides refused, `quantization_config` equal to it where present), the
safetensors header through `safetensors_io.read_header` (bounds, sizes, overlaps) with metadata
`format = mlx`, and for every module with `.scales`: uint32 `.weight` [N, K·bits/32] and `.scales` /
`.biases` [N, K/group] of one float dtype. `dense_state_dict` applies MLX's own math (scales·q +
biases); `quantized_weights()` gives back bitsmith's zero points and refuses biases that are not
-scale·zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.base import read_json_object
from bitsmith.formats.gptq.packing import unpack_dim0
from bitsmith.formats.mlx.constants import (
    BIASES,
    BITS,
    CONFIG_FILE,
    DTYPES,
    GROUP_SIZES,
    METADATA,
    MODE,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZATION_KEY,
    SCALES,
    ST_UINT32,
    WEIGHT,
    WEIGHTS_FILE,
    WORD_BITS,
    ZERO_TOLERANCE,
)
from bitsmith.formats.safetensors_io import TensorInfo, load_tensors, read_header
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class AffineLinear:
    """One quantized module as MLX stores it: codes uint8 [N, K], scales and biases [N, K/group]."""

    codes: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor

    def dequantize(self, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = self.scales.float().repeat_interleave(group_size, dim=1)
        biases = self.biases.float().repeat_interleave(group_size, dim=1)
        return (scales * self.codes.float() + biases).to(dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class MlxCheckpoint:
    """A validated MLX checkpoint: config, scheme, quantized modules and float tensors."""

    path: Path
    config: Mapping[str, Any]
    scheme: QuantScheme
    dtype: str
    layers: Mapping[str, AffineLinear]
    tensors: Mapping[str, torch.Tensor]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict with every quantized module dequantized by MLX's formula."""
        state = {name: t.to(dtype) for name, t in self.tensors.items()}
        group = self.scheme.group_size
        state.update({f"{name}.{WEIGHT}": layer.dequantize(group, dtype) for name, layer in self.layers.items()})
        return state

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """bitsmith's zero-point form of every module; `FormatError` if a bias is not -scale·zero."""
        return {name: _zero_point_form(name, layer, self.scheme) for name, layer in self.layers.items()}


def _zero_point_form(name: str, layer: AffineLinear, scheme: QuantScheme) -> QuantizedWeight:
    scales, biases = layer.scales.double(), layer.biases.double()
    ratio = torch.where(scales != 0, -biases / torch.where(scales != 0, scales, 1.0), 0.0)
    zeros = ratio.round()
    if not (torch.isfinite(ratio).all() and (ratio - zeros).abs().max() <= ZERO_TOLERANCE
            and zeros.min() >= 0 and zeros.max() <= scheme.maxq and (biases[scales == 0] == 0).all()):
        raise FormatError(f"MLX module {name!r}: biases are not -scale·zero with integer zeros in [0, {scheme.maxq}]")
    k = layer.codes.shape[1]
    return QuantizedWeight(codes=layer.codes, scales=layer.scales.float(), zeros=zeros.to(torch.int32),
                           g_idx=torch.arange(k, dtype=torch.int32) // scheme.group_size, scheme=scheme)


def _config(path: Path) -> tuple[dict[str, Any], QuantScheme]:
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, missing=f"MLX checkpoint {path} has no {CONFIG_FILE}")
    block = config.get(QUANTIZATION_KEY) if isinstance(config, dict) else None
    if not isinstance(block, dict):
        raise FormatError(f"{config_path}: no {QUANTIZATION_KEY!r} block")
    if QUANTIZATION_CONFIG_KEY in config and config[QUANTIZATION_CONFIG_KEY] != block:
        raise FormatError(f"{config_path}: {QUANTIZATION_CONFIG_KEY} differs from {QUANTIZATION_KEY}")
    if overrides := sorted(k for k, v in block.items() if isinstance(v, dict | bool)):
        raise UnsupportedError(f"{config_path}: per-module quantization overrides {overrides[:3]} are not supported")
    bits, group_size, mode = block.get("bits"), block.get("group_size"), block.get("mode", MODE)
    if mode != MODE:
        raise UnsupportedError(f"{config_path}: quantization mode {mode!r}; bitsmith reads {MODE!r} only")
    if type(bits) is not int or bits not in BITS:
        raise UnsupportedError(f"{config_path}: bits must be one of {BITS}, got {bits!r}")
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise UnsupportedError(f"{config_path}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return config, QuantScheme(bits=bits, group_size=group_size)


def _expect(info: TensorInfo | None, where: str, dtype: str, shape: tuple[int, ...]) -> None:
    if info is None:
        raise FormatError(f"{where} is missing")
    if info.dtype != dtype or info.shape != shape:
        raise FormatError(f"{where} is {info.dtype} {list(info.shape)}, expected {dtype} {list(shape)}")


def _check_module(prefix: str, infos: Mapping[str, TensorInfo], scheme: QuantScheme) -> str:
    """Shapes and dtypes of one quantized module from the header; returns its float dtype string."""
    where = f"MLX module {prefix!r}"
    scales = infos[f"{prefix}.{SCALES}"]
    if len(scales.shape) != 2 or scales.dtype not in DTYPES.values():
        raise FormatError(f"{where}.{SCALES} is {scales.dtype} {list(scales.shape)}, expected 2-D float")
    n, groups = scales.shape
    k = groups * scheme.group_size
    _expect(infos.get(f"{prefix}.{BIASES}"), f"{where}.{BIASES}", scales.dtype, (n, groups))
    _expect(infos.get(f"{prefix}.{WEIGHT}"), f"{where}.{WEIGHT}", ST_UINT32, (n, k * scheme.bits // WORD_BITS))
    return scales.dtype


def read_mlx(path: Path) -> MlxCheckpoint:
    """Validate the MLX checkpoint at `path` and return its modules and tensors."""
    path = Path(path)
    config, scheme = _config(path)
    header = read_header(path / WEIGHTS_FILE)
    if dict(header.metadata) != METADATA:
        raise FormatError(f"{header.file}: metadata {dict(header.metadata)} is not {METADATA}")
    infos = header.tensors
    prefixes = sorted(name.removesuffix(f".{SCALES}") for name in infos if name.endswith(f".{SCALES}"))
    if not prefixes:
        raise FormatError(f"{header.file}: no quantized module (no '.{SCALES}' tensor)")
    dtypes = {_check_module(prefix, infos, scheme) for prefix in prefixes}
    if len(dtypes) != 1:
        raise FormatError(f"{header.file}: scales of several dtypes {sorted(dtypes)}")
    stored = dtypes.pop()
    owned = {f"{p}.{suffix}" for p in prefixes for suffix in (WEIGHT, SCALES, BIASES)}
    loaded = load_tensors(infos.values())
    layers = {
        prefix: AffineLinear(
            codes=unpack_dim0(loaded[f"{prefix}.{WEIGHT}"].view(torch.int32).t(), scheme.bits).t().to(torch.uint8),
            scales=loaded[f"{prefix}.{SCALES}"],
            biases=loaded[f"{prefix}.{BIASES}"],
        )
        for prefix in prefixes
    }
    tensors = {name: t for name, t in loaded.items() if name not in owned}
    dtype = next(name for name, st in DTYPES.items() if st == stored)
    return MlxCheckpoint(path=path, config=config, scheme=scheme, dtype=dtype, layers=layers, tensors=tensors)
