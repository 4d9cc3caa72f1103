"""Write an AutoAWQ "GEMM" safetensors checkpoint (FORMATS.md §2) from a source model and solver results.

Why it refuses so much up front: the format has one global `bits` (4) and `group_size`, no g_idx, and
consumers trust every shape, so a layer it cannot hold would load and compute garbage, or fail deep in a
GPU loader. Every input is checked, naming the layer, before the first byte is written:

* one scheme for all layers, 4-bit, groups of `GROUP_SIZES` (not per-channel), contiguous groups (no
  act-order), codes and zeros in [0, 15] (a symmetric scheme is stored as zeros of 8), out_features a
  multiple of 8, in_features a multiple of the group size, scales finite in float16;
* only linears of the decoder blocks are quantized (AutoAWQ's and vLLM's rule: lm_head stays float);
* a block linear absent from `quantized` stays float and is named in `modules_to_not_convert`, which
  consumers match as a *substring* of module names — every entry is a full module name, checked to match
  no other linear of the model; and vLLM fuses linears that read one input (q/k/v → qkv_proj, gate/up →
  gate_up_proj), refusing a fused layer whose parts differ, so such a group is quantized whole or not at all.

Each quantized linear's `.weight` becomes qweight / qzeros / scales (its bias float16); every other
tensor is copied with its name and dtype, or replaced by its `dense` value. The writer fills an existing
empty directory (see `bitsmith.formats.base.Writer`); it never publishes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.awq.constants import (
    BIAS,
    BITS,
    BITS_KEYS,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    GROUP_SIZE_KEYS,
    GROUP_SIZES,
    MODULES_TO_NOT_CONVERT_KEY,
    PACK_FACTOR,
    QUANT_METHOD,
    QUANT_METHOD_KEY,
    QUANTIZATION_CONFIG_KEY,
    VERSION,
    VERSION_KEYS,
    WEIGHT,
    ZERO_POINT_KEY,
)
from bitsmith.formats.awq.packing import pack_layer, packed_nbytes
from bitsmith.formats.base import check_writer_inputs, copy_present_files, integer_weights, require_layers
from bitsmith.formats.gptq.writer import linear_names
from bitsmith.formats.grid_checks import check_layer, single_scheme, unquantized_config
from bitsmith.formats.packed_checkpoint import write_json, write_packed_weights
from bitsmith.formats.safetensors_io import TensorInfo, check_dense, load_tensors, scan_checkpoint
from bitsmith.models import read_config
from bitsmith.models.base import ArchAdapter
from bitsmith.quantized import Quantized, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, GPTQOptions, QuantScheme

FORMAT_NAME = "AWQ"
MARKERS = (QUANTIZATION_CONFIG_KEY, "quantization")
"""Keys of a config.json that is already quantized (HF-style, or mlx-lm's block)."""


def quantization_config(scheme: QuantScheme, modules_to_not_convert: Sequence[str]) -> dict[str, Any]:
    """The `quantization_config` block AutoAWQ writes (§2.4); an empty skip list is written as null, as AutoAWQ does."""
    return {
        QUANT_METHOD_KEY: QUANT_METHOD,
        ZERO_POINT_KEY: True,
        GROUP_SIZE_KEYS[0]: scheme.group_size,
        BITS_KEYS[0]: scheme.bits,
        VERSION_KEYS[0]: VERSION,
        MODULES_TO_NOT_CONVERT_KEY: list(modules_to_not_convert) or None,
    }


def _layers(names: Sequence[str]) -> str:
    return f"{names[0]!r}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")


def _scheme_problem(scheme: QuantScheme) -> str | None:
    if scheme.bits != BITS:
        return f"the {FORMAT_NAME} GEMM format holds {BITS}-bit codes only, not {scheme.bits}-bit"
    if scheme.group_size == PER_CHANNEL:
        return (f"per-channel scales (group_size -1) cannot be loaded by vLLM's awq kernels nor mlx-lm; "
                f"use a group size of {list(GROUP_SIZES)}")
    if scheme.group_size not in GROUP_SIZES:
        return f"group_size {scheme.group_size} is not one of {list(GROUP_SIZES)} (vLLM awq_marlin, mlx-lm)"
    return None


def check_scheme(quantized: Mapping[str, QuantizedWeight]) -> QuantScheme:
    """The one scheme of all layers; `UnsupportedError` naming the layers of any scheme AWQ cannot hold."""
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, qw in sorted(quantized.items()):
        by_scheme.setdefault(qw.scheme, []).append(name)
    for scheme, names in by_scheme.items():
        if problem := _scheme_problem(scheme):
            raise UnsupportedError(f"{FORMAT_NAME}: {problem}: layer {_layers(names)}")
    return single_scheme(quantized, fmt=FORMAT_NAME, bits=(BITS,), group_sizes=GROUP_SIZES)


def block_linears(config: Any, adapter: ArchAdapter) -> list[str]:
    """Every decoder-block linear of the model, block by block in true-sequential order."""
    return [adapter.block_name(bid, local) for bid in range(int(config.num_hidden_layers)) for local in adapter.linears]


def fused_groups(config: Any, adapter: ArchAdapter) -> list[list[str]]:
    """Linears that read one input, which vLLM fuses into one layer (q/k/v, gate/up), per block."""
    return [
        [adapter.block_name(bid, local) for local in group]
        for bid in range(int(config.num_hidden_layers))
        for group in adapter.groups
        if len(group) > 1
    ]


def check_fused_groups(groups: Iterable[Sequence[str]], quantized: Collection[str]) -> None:
    """Refuse a group of linears sharing an input that is only partly quantized (vLLM cannot load it)."""
    for group in groups:
        done = [name for name in group if name in quantized]
        if done and len(done) != len(group):
            rest = [name for name in group if name not in quantized]
            raise UnsupportedError(
                f"{FORMAT_NAME}: {done} are quantized but {rest} are not; vLLM fuses linears that read the "
                "same input into one layer and needs all or none of them quantized"
            )


def not_convert_entries(skipped: Iterable[str], linears: Iterable[str]) -> list[str]:
    """`modules_to_not_convert` for the skipped linears: their full names, each proven to be a substring
    of no other linear's name (consumers skip every module whose name *contains* an entry)."""
    entries = list(skipped)
    all_linears = sorted(set(linears) | set(entries))
    for entry in entries:
        if clashes := [name for name in all_linears if entry in name and name != entry]:
            raise UnsupportedError(
                f"{FORMAT_NAME}: skipped linear {entry!r} would also skip {clashes[:3]}: consumers match "
                "modules_to_not_convert entries as substrings of module names"
            )
    return entries


def validate_layer(name: str, qw: QuantizedWeight, source: Mapping[str, TensorInfo]) -> None:
    """One layer fits its source linear and the format (see the module docstring)."""
    info = source.get(f"{name}.{WEIGHT}")
    check_layer(name, qw, info.shape if info is not None else None, fmt=FORMAT_NAME)
    n, _ = qw.shape
    if n % PACK_FACTOR:
        raise UnsupportedError(
            f"{FORMAT_NAME}: quantized layer {name!r}: out_features {n} is not a multiple of {PACK_FACTOR} "
            "(8 output channels share one int32 word)"
        )
    if not torch.isfinite(qw.scales.to(torch.float16)).all():
        raise FormatError(f"{FORMAT_NAME}: quantized layer {name!r}: scales are not finite in float16")


def _check_names(quantized: Collection[str], blocks: Collection[str], linears: Collection[str]) -> None:
    outside = sorted(set(quantized) - set(blocks))
    if not outside:
        return
    if not_linear := [name for name in outside if name not in linears]:
        raise ConfigError(f"{FORMAT_NAME}: quantized layer {not_linear[0]!r} is not an nn.Linear of the source model")
    raise UnsupportedError(
        f"{FORMAT_NAME}: quantized layer {outside[0]!r} is outside the decoder blocks; AWQ consumers quantize "
        "block linears only (lm_head stays float)"
    )


def _check_biases(
    source: Mapping[str, TensorInfo], quantized: Collection[str], dense: Mapping[str, torch.Tensor]
) -> None:
    infos = [info for name in quantized if (info := source.get(f"{name}.{BIAS}")) is not None]
    for tensor_name, bias in load_tensors(infos, dense).items():
        if not torch.isfinite(bias.to(torch.float16)).all():
            raise FormatError(f"{FORMAT_NAME}: bias {tensor_name!r} is not finite in float16")


def write_awq(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an AWQ GEMM checkpoint into the existing empty directory `out_dir` and return it.

    `quantized` maps decoder-block linear names (``model.layers.0.self_attn.q_proj``) to solved weights
    sharing one scheme; the other block linears stay float (see the module docstring). `dense` replaces
    source tensors (see `bitsmith.formats.base.Writer`). `variant` may only be "gemm" (the default).
    `options` is accepted for the writer protocol: act-order is refused from the g_idx itself. Weights
    larger than `max_shard_bytes` are split into shards with an index.
    """
    quantized = integer_weights(quantized, "AWQ")
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    if variant not in (None, "", VERSION):
        raise ConfigError(f"{FORMAT_NAME} variant must be {VERSION!r} (the only layout), got {variant!r}")
    check_writer_inputs(out_dir, max_shard_bytes=max_shard_bytes)
    raw_config = unquantized_config(source_model_dir, markers=MARKERS)
    config, adapter = read_config(source_model_dir)
    source = scan_checkpoint(source_model_dir)
    require_layers(quantized, FORMAT_NAME)
    blocks = block_linears(config, adapter)
    linears = linear_names(source_model_dir)
    _check_names(quantized, blocks, linears)
    scheme = check_scheme(quantized)
    for name, qw in sorted(quantized.items()):
        validate_layer(name, qw, source)
    if missing := [name for name in blocks if f"{name}.{WEIGHT}" not in source]:
        raise FormatError(f"source model {source_model_dir} lacks {missing[0]}.{WEIGHT}")
    check_fused_groups(fused_groups(config, adapter), quantized)
    skipped = not_convert_entries((name for name in blocks if name not in quantized), linears)
    check_dense(source, dense or {}, quantized=quantized)
    _check_biases(source, quantized, dense or {})

    write_packed_weights(
        out_dir,
        source=source,
        quantized=quantized,
        pack=pack_layer,
        packed_nbytes=packed_nbytes,
        dense=dense,
        max_shard_bytes=max_shard_bytes,
    )
    write_json(out_dir / CONFIG_FILE, {**raw_config, QUANTIZATION_CONFIG_KEY: quantization_config(scheme, skipped)})
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir
