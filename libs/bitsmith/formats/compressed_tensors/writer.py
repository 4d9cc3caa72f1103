"""Write a compressed-tensors "pack-quantized" checkpoint (FORMATS.md §3) from a source model and solver results.

Why the codes go in unchanged: compressed-tensors stores signed values q_s = code - 2^(b-1) as
q_s + 2^(b-1) and signed zero points likewise, and dequantizes (q_s - zp_s)·scale — the same number
as bitsmith's (code - zero)·scale. So the stored fields are our unsigned codes and zeros as they are.
A symmetric bitsmith grid (zero = 2^(b-1) everywhere) is a compressed-tensors symmetric grid (zero
point 0, not stored); any other grid is written asymmetric with `weight_zero_point`.

Layers may use different schemes (mixed precision): there is one config group per distinct
(bits, group size, symmetry, act-order); the group with the most layers targets the class "Linear"
(and comes last, see `plan_groups`), the others name their modules exactly — an exact name outranks
a class name in compressed-tensors' matching, so every module resolves to one group. Every linear of
the source that is not quantized (lm_head, skipped layers) is listed in `ignore`, so "Linear" cannot
reach it. All groups are "pack-quantized", so the top-level format is too (not "mixed-precision").

Scales are stored in the dtype of the source weight (bf16/fp16/fp32; fp16 otherwise), as
llm-compressor does. That rounds our fp32 scales once (relative error ≤ 2^-9 for bf16) — exactly the
rounding every consumer applies anyway: vLLM loads scales into the model dtype and compressed-tensors
dequantizes in the scale dtype, so more precision in the file would never be used. A scale that
overflows or underflows to zero in that dtype is refused.

Act-order: compressed-tensors ≥ 0.19 removed `actorder: "group"` (a config carrying it does not parse
and `weight_g_idx` is ignored), so by default a layer whose g_idx is not arange(K)//group_size is
refused; quantize with static_groups (contiguous groups) instead. The "actorder-group" variant writes
such layers with `weight_g_idx` for consumers pinned to compressed-tensors 0.18 (see `constants`).

3-bit layers use the dense bit stream of compressed-tensors ≥ 0.18 (0.17 and older read 3-bit
differently and refuse these shapes). The writer fills an existing empty directory; it never publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError, UnsupportedError
from bitsmith.formats.base import copy_file_synced, integer_weights, save_safetensors_atomic
from bitsmith.formats.compressed_tensors.constants import (
    ACTORDER_GROUP,
    BITS,
    COMPRESSED,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    FALLBACK_SCALE_DTYPE,
    GROUP_NAME,
    INT,
    LEGACY_ACTORDER_VERSION,
    LINEAR_CLASS,
    PACK_QUANTIZED,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    SCALE_DTYPES,
    STRATEGY_CHANNEL,
    STRATEGY_GROUP,
    VARIANT_ACTORDER_GROUP,
    VARIANTS,
    WEIGHT,
    WEIGHT_G_IDX,
    WEIGHT_PACKED,
    WEIGHT_SCALE,
    WEIGHT_SHAPE,
    WEIGHT_ZERO_POINT,
    WRITTEN_VERSION,
)
from bitsmith.formats.compressed_tensors.matching import model_modules
from bitsmith.formats.compressed_tensors.packing import pack_rows, packed_width
from bitsmith.formats.grid_checks import check_source_weight, unquantized_config
from bitsmith.formats.packed_checkpoint import write_json
from bitsmith.formats.safetensors_io import (
    INDEX_FILE,
    PT_METADATA,
    SHARD_TEMPLATE,
    WEIGHTS_FILE,
    TensorInfo,
    check_dense,
    load_tensors,
    scan_checkpoint,
)
from bitsmith.quantized import GGMLWeight, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, GPTQOptions

FORMAT_NAME = "compressed-tensors"

GroupKey = tuple[int, int, bool, bool]
"""(bits, group_size, sym, act-order g_idx): what makes two layers need different config groups."""


@dataclass(frozen=True, slots=True)
class ConfigGroup:
    """One `config_groups` entry: its grid and the layers it quantizes."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool
    layers: tuple[str, ...]


def parse_variant(variant: str | None) -> bool:
    """Whether act-order layers are kept (the "actorder-group" variant); `ConfigError` for unknown variants."""
    if not variant:
        return False
    if variant not in VARIANTS:
        raise ConfigError(f"{FORMAT_NAME} variant must be one of {list(VARIANTS)} or empty, got {variant!r}")
    return variant == VARIANT_ACTORDER_GROUP


def scale_dtype(weight: TensorInfo) -> torch.dtype:
    """The dtype scales are stored in: the source weight's, as llm-compressor does (module docstring)."""
    name = SCALE_DTYPES[weight.dtype if weight.dtype in SCALE_DTYPES else FALLBACK_SCALE_DTYPE]
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _check_range(where: str, what: str, values: torch.Tensor, low: int, high: int) -> None:
    if values.is_floating_point():
        raise FormatError(f"{where}: {what} must be integers, got {values.dtype}")
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        raise FormatError(f"{where}: {what} span [{int(values.min())}, {int(values.max())}], allowed [{low}, {high}]")


def validate_layer(
    name: str, qw: QuantizedWeight, source: Mapping[str, TensorInfo], linears: frozenset[str], *, keep_act_order: bool
) -> bool:
    """Refuse a layer that would make a wrong or unloadable checkpoint; True if it uses an act-order g_idx."""
    where = f"{FORMAT_NAME}: quantized layer {name!r}"
    if name not in linears:
        raise ConfigError(f"{where} is not an nn.Linear of the source model")
    weight = source.get(f"{name}.{WEIGHT}")
    check_source_weight(where, name, qw, weight.shape if weight is not None else None)
    scheme, (_, k) = qw.scheme, qw.shape
    if scheme.bits not in BITS:
        raise UnsupportedError(f"{where}: {scheme.bits}-bit codes; the writer carries {list(BITS)}-bit")
    group_size = scheme.effective_group_size(k)
    if k % group_size:
        raise UnsupportedError(f"{where}: group_size {group_size} does not divide in_features {k}")
    groups = k // group_size
    if qw.scales.shape[1] != groups:
        raise FormatError(f"{where}: {qw.scales.shape[1]} groups, expected {groups} for K={k}")
    _check_range(where, "codes", qw.codes, 0, scheme.maxq)
    mid = 1 << (scheme.bits - 1)
    if scheme.sym:
        _check_range(where, "symmetric zeros", qw.zeros, mid, mid)
    else:
        _check_range(where, "zeros", qw.zeros, 0, scheme.maxq)
    stored = qw.scales.to(scale_dtype(source[f"{name}.{WEIGHT}"]))  # present: checked above
    if not torch.isfinite(qw.scales).all() or not torch.isfinite(stored).all():
        raise FormatError(f"{where}: scales are not finite in {stored.dtype}")
    if bool(((stored == 0) & (qw.scales != 0)).any()):
        raise FormatError(f"{where}: non-zero scales underflow to zero in {stored.dtype}")
    return _check_g_idx(where, qw.g_idx, k, group_size, groups, keep_act_order=keep_act_order)


def _check_g_idx(
    where: str, g_idx: torch.Tensor, k: int, group_size: int, groups: int, *, keep_act_order: bool
) -> bool:
    trivial = torch.arange(k, dtype=torch.int64) // group_size
    g = g_idx.to(torch.int64)
    if torch.equal(g, trivial):
        return False
    if not keep_act_order:
        raise UnsupportedError(
            f"{where}: g_idx is not arange(K)//group_size (act-order), and compressed-tensors >= 0.19 "
            f'no longer reads weight_g_idx (actorder "group" was removed); quantize with static_groups, '
            f'or write the "{VARIANT_ACTORDER_GROUP}" variant for consumers pinned to compressed-tensors 0.18'
        )
    _check_range(where, "g_idx", g_idx, 0, groups - 1)
    if not torch.equal(torch.bincount(g, minlength=groups), torch.bincount(trivial, minlength=groups)):
        raise FormatError(f"{where}: act-order g_idx must put exactly group_size columns in every group")
    return True


def plan_groups(quantized: Mapping[str, QuantizedWeight], act_order: frozenset[str]) -> list[ConfigGroup]:
    """Layers by distinct grid; the group with most layers comes last and targets "Linear".

    Last, because compressed-tensors' `match_named_modules` credits a module to the first target in
    config order that matches it and warns about targets never credited: with "Linear" first, every
    exact name of the other groups would be reported as unmatched (the scheme chosen is the same).
    """
    by_key: dict[GroupKey, list[str]] = {}
    for name, qw in sorted(quantized.items()):
        s = qw.scheme
        by_key.setdefault((s.bits, s.group_size, s.sym, name in act_order), []).append(name)
    ordered = sorted(by_key.items(), key=lambda item: (len(item[1]), item[0]))
    return [ConfigGroup(*key, layers=tuple(names)) for key, names in ordered]


def weights_args(group: ConfigGroup) -> dict[str, Any]:
    """QuantizationArgs of a group's weights, with only keys every compressed-tensors release knows."""
    channel = group.group_size == PER_CHANNEL
    return {
        "num_bits": group.bits,
        "type": INT,
        "symmetric": group.sym,
        "group_size": None if channel else group.group_size,
        "strategy": STRATEGY_CHANNEL if channel else STRATEGY_GROUP,
        "block_structure": None,
        "dynamic": False,
        "actorder": ACTORDER_GROUP if group.act_order else None,
    }


def quantization_config(groups: list[ConfigGroup], ignore: list[str], *, version: str) -> dict[str, Any]:
    """config.json's `quantization_config`: one pack-quantized group per grid (module docstring)."""
    config_groups = {
        GROUP_NAME.format(index=i): {
            "targets": [LINEAR_CLASS] if i == len(groups) - 1 else list(group.layers),
            "weights": weights_args(group),
            "input_activations": None,
            "output_activations": None,
            "format": PACK_QUANTIZED,
        }
        for i, group in enumerate(groups)
    }
    return {
        "config_groups": config_groups,
        "format": PACK_QUANTIZED,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": COMPRESSED,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def pack_layer(qw: QuantizedWeight, dtype: torch.dtype, *, act_order: bool) -> dict[str, torch.Tensor]:
    """The tensors of one (validated) quantized linear, keyed by suffix."""
    bits = qw.scheme.bits
    tensors = {
        WEIGHT_PACKED: pack_rows(qw.codes, bits),
        WEIGHT_SCALE: qw.scales.to(dtype, copy=True).contiguous(),  # never a view of a solver's tensor
        WEIGHT_SHAPE: torch.tensor(qw.shape, dtype=torch.int64),
    }
    if not qw.scheme.sym:
        tensors[WEIGHT_ZERO_POINT] = pack_rows(qw.zeros.t(), bits).t().contiguous()
    if act_order:
        tensors[WEIGHT_G_IDX] = qw.g_idx.to(torch.int32, copy=True).contiguous()
    return tensors


def packed_nbytes(qw: QuantizedWeight, dtype: torch.dtype, *, act_order: bool) -> int:
    """Bytes of a layer's tensors (for sharding before anything is packed)."""
    (n, k), groups, bits = qw.shape, qw.scales.shape[1], qw.scheme.bits
    nbytes = 4 * n * packed_width(k, bits) + dtype.itemsize * n * groups + 8 * 2
    if not qw.scheme.sym:
        nbytes += 4 * packed_width(n, bits) * groups
    return nbytes + (4 * k if act_order else 0)


@dataclass(frozen=True, slots=True)
class _Item:
    """One output entry: a source tensor to copy, or a layer to pack."""

    nbytes: int
    source: TensorInfo | None = None
    layer: str | None = None


def write_compressed_tensors(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, QuantizedWeight | GGMLWeight],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a compressed-tensors checkpoint into the existing empty directory `out_dir` and return it.

    `quantized` maps linear module names (``model.layers.0.self_attn.q_proj``) to solved weights, any mix
    of schemes; linears absent from it stay float and are listed in `ignore`. `dense` replaces source
    tensors (see `bitsmith.formats.base.Writer`). `variant` is empty or "actorder-group" (module
    docstring). `options` is accepted for the writer protocol: act-order is seen in each layer's g_idx.
    Weights larger than `max_shard_bytes` are split into shards with an index, as transformers does.
    """
    quantized = integer_weights(quantized, "compressed-tensors")
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    keep_act_order = parse_variant(variant)
    if not out_dir.is_dir():
        raise ConfigError(f"output directory {out_dir} does not exist (stage it first)")
    if any(out_dir.iterdir()):
        raise AlreadyExistsError(f"output directory {out_dir} is not empty")
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not quantized:
        raise ConfigError(f"the {FORMAT_NAME} writer got no quantized layers")
    config = unquantized_config(source_model_dir, markers=(QUANTIZATION_CONFIG_KEY,))
    source = scan_checkpoint(source_model_dir)
    linears = frozenset(name for name, m in model_modules(source_model_dir).items() if LINEAR_CLASS in m.classes)
    act_order = frozenset(
        name
        for name, qw in sorted(quantized.items())
        if validate_layer(name, qw, source, linears, keep_act_order=keep_act_order)
    )
    check_dense(source, dense or {}, quantized=quantized)

    dtypes = {name: scale_dtype(source[f"{name}.{WEIGHT}"]) for name in quantized}
    items: list[_Item] = []
    for tensor_name, info in sorted(source.items()):
        prefix, _, suffix = tensor_name.rpartition(".")
        if prefix in quantized and suffix == WEIGHT:
            qw = quantized[prefix]
            items.append(_Item(packed_nbytes(qw, dtypes[prefix], act_order=prefix in act_order), layer=prefix))
        else:
            items.append(_Item(info.nbytes, source=info))
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes

    weight_map: dict[str, str] = {}
    total_size = 0
    for index, shard in enumerate(shards, start=1):
        file = WEIGHTS_FILE if len(shards) == 1 else SHARD_TEMPLATE.format(index=index, total=len(shards))
        tensors = load_tensors((item.source for item in shard if item.source is not None), dense)
        for item in shard:
            if item.layer is not None:
                packed = pack_layer(quantized[item.layer], dtypes[item.layer], act_order=item.layer in act_order)
                tensors.update({f"{item.layer}.{suffix}": t for suffix, t in packed.items()})
        save_safetensors_atomic(out_dir / file, tensors, PT_METADATA)
        weight_map.update(dict.fromkeys(tensors, file))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})

    ignore = sorted(linears - set(quantized))
    version = LEGACY_ACTORDER_VERSION if act_order else WRITTEN_VERSION
    qcfg = quantization_config(plan_groups(quantized, act_order), ignore, version=version)
    write_json(out_dir / CONFIG_FILE, {**config, QUANTIZATION_CONFIG_KEY: qcfg})
    for name in COPIED_FILES:
        if (source_model_dir / name).is_file():
            copy_file_synced(source_model_dir / name, out_dir / name)
    return out_dir
