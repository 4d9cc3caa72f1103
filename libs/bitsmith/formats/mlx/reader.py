"""Read and validate an MLX quantized checkpoint (FORMATS.md §6, checklist §8).

Checked before anything is loaded: config.json's `quantization` block (a global affine scheme bitsmith
can represent, plus per-module entries ``"<module path>": {"group_size", "bits"[, "mode"]}`` each with
supported values and naming a module stored quantized; `quantization_config` equal to the block where
present), the safetensors header through `safetensors_io.read_header` (bounds, sizes, overlaps) with
metadata `format = mlx`, and for every module with `.scales`, under its own scheme (its entry, else the
global one): uint32 `.weight` [N, K·bits/32] and `.scales` / `.biases` [N, K/group] of one float dtype.
Modules without `.scales` (embeddings, linears kept in float) are float tensors. `dense_state_dict`
applies MLX's own math (scales·q + biases); `quantized_weights()` gives back bitsmith's zero points and
refuses biases that are not -scale·zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.base import dense_state, read_json_object
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
from bitsmith.formats.safetensors_io import TensorInfo, expect_tensor, load_tensors, read_header
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class AffineLinear:
    """One quantized module as MLX stores it: codes uint8 [N, K], scales and biases [N, K/group], and the
    bits/group size it is stored with (bitsmith's asymmetric scheme of them)."""

    codes: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    scheme: QuantScheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        group_size = self.scheme.group_size
        scales = self.scales.float().repeat_interleave(group_size, dim=1)
        biases = self.biases.float().repeat_interleave(group_size, dim=1)
        return (scales * self.codes.float() + biases).to(dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class MlxCheckpoint:
    """A validated MLX checkpoint: config, global scheme, quantized modules (each with its own scheme) and
    float tensors. `overrides` are the per-module entries of the `quantization` block."""

    path: Path
    config: Mapping[str, Any]
    scheme: QuantScheme
    overrides: Mapping[str, QuantScheme]
    dtype: str
    layers: Mapping[str, AffineLinear]
    tensors: Mapping[str, torch.Tensor]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict with every quantized module dequantized by MLX's formula."""
        return dense_state(self.tensors, self.layers, dtype)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """bitsmith's zero-point form of every module; `FormatError` if a bias is not -scale·zero."""
        return {name: _zero_point_form(name, layer) for name, layer in self.layers.items()}


def _zero_point_form(name: str, layer: AffineLinear) -> QuantizedWeight:
    scheme = layer.scheme
    scales, biases = layer.scales.double(), layer.biases.double()
    ratio = torch.where(scales != 0, -biases / torch.where(scales != 0, scales, 1.0), 0.0)
    zeros = ratio.round()
    if not (torch.isfinite(ratio).all() and (ratio - zeros).abs().max() <= ZERO_TOLERANCE
            and zeros.min() >= 0 and zeros.max() <= scheme.maxq and (biases[scales == 0] == 0).all()):
        raise FormatError(f"MLX module {name!r}: biases are not -scale·zero with integer zeros in [0, {scheme.maxq}]")
    k = layer.codes.shape[1]
    return QuantizedWeight(codes=layer.codes, scales=layer.scales.float(), zeros=zeros.to(torch.int32),
                           g_idx=torch.arange(k, dtype=torch.int32) // scheme.group_size, scheme=scheme)


GLOBAL_KEYS = ("group_size", "bits", "mode")
"""Keys of the block's global parameters; every other key with an object value is a module path."""
ENTRY_KEYS = frozenset(GLOBAL_KEYS)


def _affine_scheme(where: str, params: Mapping[str, Any]) -> QuantScheme:
    """bitsmith's scheme of mlx-lm quantization parameters; `UnsupportedError` for what bitsmith cannot read."""
    bits, group_size, mode = params.get("bits"), params.get("group_size"), params.get("mode", MODE)
    if mode != MODE:
        raise UnsupportedError(f"{where}: quantization mode {mode!r}; bitsmith reads {MODE!r} only")
    if type(bits) is not int or bits not in BITS:
        raise UnsupportedError(f"{where}: bits must be one of {BITS}, got {bits!r}")
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise UnsupportedError(f"{where}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return QuantScheme(bits=bits, group_size=group_size)


def _config(path: Path) -> tuple[dict[str, Any], QuantScheme, dict[str, QuantScheme]]:
    """config.json, the block's global scheme, and its per-module entries (module path → scheme)."""
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, missing=f"MLX checkpoint {path} has no {CONFIG_FILE}")
    block = config.get(QUANTIZATION_KEY) if isinstance(config, dict) else None
    if not isinstance(block, dict):
        raise FormatError(f"{config_path}: no {QUANTIZATION_KEY!r} block")
    if QUANTIZATION_CONFIG_KEY in config and config[QUANTIZATION_CONFIG_KEY] != block:
        raise FormatError(f"{config_path}: {QUANTIZATION_CONFIG_KEY} differs from {QUANTIZATION_KEY}")
    scheme = _affine_scheme(str(config_path), block)
    overrides: dict[str, QuantScheme] = {}
    for key, value in sorted(block.items()):
        if key in GLOBAL_KEYS:
            continue
        where = f"{config_path}: {QUANTIZATION_KEY}[{key!r}]"
        if isinstance(value, bool):
            raise UnsupportedError(f"{where} is {value!r}; bitsmith reads per-module entries as "
                                   "{group_size, bits, mode} objects (a float module has no entry)")
        if not isinstance(value, dict):
            continue  # a global knob of another mlx-lm version (affine ignores it)
        if unknown := sorted(set(value) - ENTRY_KEYS):
            raise UnsupportedError(f"{where}: unknown keys {unknown}; bitsmith reads {sorted(ENTRY_KEYS)}")
        overrides[key] = _affine_scheme(where, value)
    return config, scheme, overrides


def _check_module(prefix: str, infos: Mapping[str, TensorInfo], scheme: QuantScheme) -> str:
    """Shapes and dtypes of one quantized module from the header; returns its float dtype string."""
    where = f"MLX module {prefix!r}"
    scales = infos[f"{prefix}.{SCALES}"]
    if len(scales.shape) != 2 or scales.dtype not in DTYPES.values():
        raise FormatError(f"{where}.{SCALES} is {scales.dtype} {list(scales.shape)}, expected 2-D float")
    n, groups = scales.shape
    k = groups * scheme.group_size
    expect_tensor(infos.get(f"{prefix}.{BIASES}"), f"{where}.{BIASES}", (scales.dtype,), [(n, groups)],
                  name_file=False)
    expect_tensor(infos.get(f"{prefix}.{WEIGHT}"), f"{where}.{WEIGHT}", (ST_UINT32,),
                  [(n, k * scheme.bits // WORD_BITS)], name_file=False)
    return scales.dtype


def read_mlx(path: Path) -> MlxCheckpoint:
    """Validate the MLX checkpoint at `path` and return its modules and tensors."""
    path = Path(path)
    config, scheme, overrides = _config(path)
    header = read_header(path / WEIGHTS_FILE)
    if dict(header.metadata) != METADATA:
        raise FormatError(f"{header.file}: metadata {dict(header.metadata)} is not {METADATA}")
    infos = header.tensors
    prefixes = sorted(name.removesuffix(f".{SCALES}") for name in infos if name.endswith(f".{SCALES}"))
    if not prefixes:
        raise FormatError(f"{header.file}: no quantized module (no '.{SCALES}' tensor)")
    if unknown := sorted(set(overrides) - set(prefixes)):
        raise FormatError(f"{path / CONFIG_FILE}: {QUANTIZATION_KEY} has entries for {unknown[:3]}, which "
                          f"{header.file.name} does not store quantized (no '.{SCALES}')")
    schemes = {prefix: overrides.get(prefix, scheme) for prefix in prefixes}
    dtypes = {_check_module(prefix, infos, schemes[prefix]) for prefix in prefixes}
    if len(dtypes) != 1:
        raise FormatError(f"{header.file}: scales of several dtypes {sorted(dtypes)}")
    stored = dtypes.pop()
    owned = {f"{p}.{suffix}" for p in prefixes for suffix in (WEIGHT, SCALES, BIASES)}
    loaded = load_tensors(infos.values())
    layers = {
        prefix: AffineLinear(
            codes=unpack_dim0(loaded[f"{prefix}.{WEIGHT}"].view(torch.int32).t(), own.bits).t().to(torch.uint8),
            scales=loaded[f"{prefix}.{SCALES}"],
            biases=loaded[f"{prefix}.{BIASES}"],
            scheme=own,
        )
        for prefix, own in schemes.items()
    }
    tensors = {name: t for name, t in loaded.items() if name not in owned}
    dtype = next(name for name, st in DTYPES.items() if st == stored)
    return MlxCheckpoint(path=path, config=config, scheme=scheme, overrides=overrides, dtype=dtype, layers=layers,
                         tensors=tensors)
