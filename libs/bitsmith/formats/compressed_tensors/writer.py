"""Write a compressed-tensors checkpoint (FORMATS.md §3) from a source model and solver results.

Integer layers (`QuantizedWeight`) are written "pack-quantized", FP8 layers (`FP8Weight`) "float-quantized"
(W8A8 FP8, as llm-compressor's FP8 / FP8_DYNAMIC presets write it and vLLM's CompressedTensorsW8A8Fp8
loads it); ggml-block layers are refused (only GGUF stores them).

Why the codes go in unchanged: compressed-tensors stores signed values q_s = code - 2^(b-1) as
q_s + 2^(b-1) and signed zero points likewise, and dequantizes (q_s - zp_s)·scale — the same number
as bitsmith's (code - zero)·scale. So the stored fields are our unsigned codes and zeros as they are.
A symmetric bitsmith grid (zero = 2^(b-1) everywhere) is a compressed-tensors symmetric grid (zero
point 0, not stored); any other grid is written asymmetric with `weight_zero_point`.

Layers may use different schemes (mixed precision): there is one config group per distinct grid —
(bits, group size, symmetry, act-order) for integers, (per-channel, static activations) for FP8; the
group with the most layers targets the class "Linear" (and comes last, see `plan_groups`), the others
name their modules exactly — an exact name outranks a class name in compressed-tensors' matching, so
every module resolves to one group. Every linear of the source that is not quantized (lm_head, skipped
layers) is listed in `ignore`, so "Linear" cannot reach it. Each group names its format; the top-level
`format` is that format when all groups share it, else "mixed-precision" (§3.1) — so a recipe with
int4 MLP and FP8 attention is one file that compressed-tensors and vLLM load group by group.

Integer scales are stored in the dtype of the source weight (bf16/fp16/fp32; fp16 otherwise), as
llm-compressor does. That rounds our fp32 scales once (relative error ≤ 2^-9 for bf16) — exactly the
rounding every consumer applies anyway: vLLM loads scales into the model dtype and compressed-tensors
dequantizes in the scale dtype, so more precision in the file would never be used. A scale that
overflows or underflows to zero in that dtype is refused.

Act-order: compressed-tensors ≥ 0.19 removed `actorder: "group"` (a config carrying it does not parse
and `weight_g_idx` is ignored), so by default a layer whose g_idx is not arange(K)//group_size is
refused; quantize with static_groups (contiguous groups) instead. The "actorder-group" variant writes
such layers with `weight_g_idx` for consumers pinned to compressed-tensors 0.18 (see `constants`).

FP8 layers: `weight` is the float8_e4m3fn data as solved, `weight_scale` float32 [N, 1] (channel) or
[1] (tensor), `input_scale` float32 [1] with static activations (none with dynamic ones, which the
runtime scales per token). Unlike llm-compressor, which stores these scales in the weight's dtype, the
writer keeps them float32, so the file dequantizes to exactly our `FP8Weight`: the e4m3 values were
rounded against the float32 scale, and the consumers use it at full precision — vLLM's
CompressedTensorsW8A8Fp8 allocates `weight_scale` and `input_scale` as float32 and hands them to the
FP8 GEMM as they are, and compressed-tensors dequantizes in the scale dtype, i.e. computes the very
float32 product `data.float() * scale` that `FP8Weight.dequantize` does (the consumer test checks it
bit for bit). A bf16 copy would move every weight of a row by up to 2^-9 of itself to save 2 bytes
per row; the reader accepts bf16/fp16 scales from llm-compressor's files all the same.

3-bit layers use the dense bit stream of compressed-tensors ≥ 0.18 (0.17 and older read 3-bit
differently and refuse these shapes). The writer fills an existing empty directory; it never publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.base import check_writer_inputs, copy_present_files
from bitsmith.formats.compressed_tensors.constants import (
    ACTORDER_GROUP,
    BITS,
    COMPRESSED,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    FALLBACK_SCALE_DTYPE,
    FLOAT,
    FLOAT_QUANTIZED,
    FP8_BITS,
    GROUP_NAME,
    INPUT_SCALE,
    INT,
    LEGACY_ACTORDER_VERSION,
    LINEAR_CLASS,
    MIXED_PRECISION,
    OBSERVER_MINMAX,
    PACK_QUANTIZED,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    SCALE_DTYPES,
    STRATEGY_CHANNEL,
    STRATEGY_GROUP,
    STRATEGY_TENSOR,
    STRATEGY_TOKEN,
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
from bitsmith.formats.packed_checkpoint import write_json, write_packed_weights
from bitsmith.formats.safetensors_io import (
    TensorInfo,
    check_dense,
    scan_checkpoint,
)
from bitsmith.quantized import FP8Weight, Quantized, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, FP8Scheme, GPTQOptions

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


@dataclass(frozen=True, slots=True)
class FP8Group:
    """One "float-quantized" `config_groups` entry: its FP8 grid and the layers it quantizes."""

    scheme: FP8Scheme
    layers: tuple[str, ...]


AnyGroup = ConfigGroup | FP8Group


def split_layers(quantized: Mapping[str, Quantized]) -> tuple[dict[str, QuantizedWeight], dict[str, FP8Weight]]:
    """Integer and FP8 layers apart; `FormatError` naming a layer on any other grid (ggml blocks: GGUF only)."""
    ints: dict[str, QuantizedWeight] = {}
    fp8: dict[str, FP8Weight] = {}
    for name, weight in sorted(quantized.items()):
        if isinstance(weight, QuantizedWeight):
            ints[name] = weight
        elif isinstance(weight, FP8Weight):
            fp8[name] = weight
        else:
            raise FormatError(
                f"{name} was solved onto the {weight.scheme.label} grid, which {FORMAT_NAME} cannot store; "
                f"{FORMAT_NAME} needs an integer-grid or FP8 solve"
            )
    return ints, fp8


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


def _check_positive(where: str, what: str, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
        raise FormatError(f"{where}: {what} must be finite and > 0")


def validate_fp8_layer(name: str, w: FP8Weight, source: Mapping[str, TensorInfo], linears: frozenset[str]) -> None:
    """Refuse an FP8 layer that would make a wrong or unloadable checkpoint, as `validate_layer` does for ints.

    `FP8Weight` checks its dtypes and shapes when built, but a layer from the store or the wire is checked
    again here (cheap), besides what it cannot know: the source linear, and the numbers.
    """
    where = f"{FORMAT_NAME}: quantized layer {name!r}"
    if name not in linears:
        raise ConfigError(f"{where} is not an nn.Linear of the source model")
    weight = source.get(f"{name}.{WEIGHT}")
    if weight is None or len(weight.shape) != 2:
        raise ConfigError(f"{where}: the source checkpoint has no 2-D {name}.{WEIGHT}")
    if w.data.dtype != torch.float8_e4m3fn or w.data.dim() != 2:
        raise FormatError(f"{where}: FP8 data must be float8_e4m3fn [N, K], got {w.data.dtype} {list(w.data.shape)}")
    if tuple(weight.shape) != w.shape:
        raise ConfigError(f"{where}: source weight is {list(weight.shape)}, FP8 data is {list(w.shape)}")
    scales = w.shape[0] if w.scheme.per_channel else 1
    if w.scale.dtype != torch.float32 or tuple(w.scale.shape) != (scales,):
        raise FormatError(
            f"{where}: {w.scheme.label} needs a float32 scale [{scales}], got {w.scale.dtype} {list(w.scale.shape)}"
        )
    _check_positive(where, "weight scales", w.scale)
    if w.scheme.static_activations:
        if w.input_scale is None or w.input_scale.dtype != torch.float32 or w.input_scale.numel() != 1:
            got = None if w.input_scale is None else f"{w.input_scale.dtype} {list(w.input_scale.shape)}"
            raise FormatError(f"{where}: static activations need a float32 input_scale [1], got {got}")
        _check_positive(where, "input_scale", w.input_scale)
    elif w.input_scale is not None:
        raise FormatError(f"{where}: dynamic activations take no input_scale")
    # e4m3fn has no infinities; its NaNs are the bit patterns s.1111.111.
    if bool(((w.data.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise FormatError(f"{where}: FP8 data contains NaN")


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


def plan_groups(
    quantized: Mapping[str, QuantizedWeight], act_order: frozenset[str], fp8: Mapping[str, FP8Weight] | None = None
) -> list[AnyGroup]:
    """Layers by distinct grid; the group with most layers comes last and targets "Linear".

    Last, because compressed-tensors' `match_named_modules` credits a module to the first target in
    config order that matches it and warns about targets never credited: with "Linear" first, every
    exact name of the other groups would be reported as unmatched (the scheme chosen is the same).
    Ties go by grid (integer grids before FP8 ones), so the order does not depend on the input's.
    """
    by_key: dict[GroupKey, list[str]] = {}
    for name, qw in sorted(quantized.items()):
        s = qw.scheme
        by_key.setdefault((s.bits, s.group_size, s.sym, name in act_order), []).append(name)
    by_fp8: dict[tuple[bool, bool], list[str]] = {}
    for name, w in sorted((fp8 or {}).items()):
        by_fp8.setdefault((w.scheme.per_channel, w.scheme.static_activations), []).append(name)
    keyed: list[tuple[tuple[int, int, tuple[int, ...]], AnyGroup]] = []
    for key, names in by_key.items():
        keyed.append(((len(names), 0, tuple(map(int, key))), ConfigGroup(*key, layers=tuple(names))))
    for (per_channel, static), names in by_fp8.items():
        scheme = FP8Scheme(per_channel=per_channel, static_activations=static)
        keyed.append(((len(names), 1, (per_channel, static)), FP8Group(scheme, layers=tuple(names))))
    return [group for _, group in sorted(keyed, key=lambda item: item[0])]


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


def fp8_weights_args(scheme: FP8Scheme) -> dict[str, Any]:
    """QuantizationArgs of an FP8 group's weights: e4m3 ("float", 8 bits), symmetric, per channel or tensor."""
    return {
        "num_bits": FP8_BITS,
        "type": FLOAT,
        "symmetric": True,
        "group_size": None,
        "strategy": STRATEGY_CHANNEL if scheme.per_channel else STRATEGY_TENSOR,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
    }


def fp8_input_args(scheme: FP8Scheme) -> dict[str, Any]:
    """QuantizationArgs of an FP8 group's input activations: a calibrated per-tensor scale (`input_scale`,
    observer "minmax" as llm-compressor's FP8 preset) or one computed per token at run time (FP8_DYNAMIC)."""
    args: dict[str, Any] = {"num_bits": FP8_BITS, "type": FLOAT, "symmetric": True, "group_size": None}
    if scheme.static_activations:
        return {**args, "strategy": STRATEGY_TENSOR, "dynamic": False, "observer": OBSERVER_MINMAX}
    return {**args, "strategy": STRATEGY_TOKEN, "dynamic": True}


def group_config(group: AnyGroup, targets: list[str]) -> dict[str, Any]:
    """One QuantizationScheme: integer groups quantize weights only, FP8 groups weights and inputs."""
    if isinstance(group, FP8Group):
        weights, inputs, fmt = fp8_weights_args(group.scheme), fp8_input_args(group.scheme), FLOAT_QUANTIZED
    else:
        weights, inputs, fmt = weights_args(group), None, PACK_QUANTIZED
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": inputs,
        "output_activations": None,
        "format": fmt,
    }


def quantization_config(groups: list[AnyGroup], ignore: list[str], *, version: str) -> dict[str, Any]:
    """config.json's `quantization_config`: one group per grid, "mixed-precision" if formats differ (module
    docstring)."""
    config_groups = {
        GROUP_NAME.format(index=i): group_config(group, [LINEAR_CLASS] if i == len(groups) - 1 else list(group.layers))
        for i, group in enumerate(groups)
    }
    formats = {group["format"] for group in config_groups.values()}
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else MIXED_PRECISION,
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


def fp8_tensors(w: FP8Weight) -> dict[str, torch.Tensor]:
    """The tensors of one (validated) FP8 linear, keyed by suffix: data as is, float32 scales (module docstring)."""
    scale = w.scale.to(torch.float32, copy=True)  # never a view of a solver's tensor
    tensors = {
        WEIGHT: w.data.clone().contiguous(),
        WEIGHT_SCALE: scale.reshape(-1, 1) if w.scheme.per_channel else scale.reshape(1),
    }
    if w.input_scale is not None:
        tensors[INPUT_SCALE] = w.input_scale.to(torch.float32, copy=True).reshape(1)
    return tensors


def fp8_nbytes(w: FP8Weight) -> int:
    """Bytes of an FP8 layer's tensors (for sharding)."""
    n, k = w.shape
    return n * k + 4 * (n if w.scheme.per_channel else 1) + (4 if w.input_scale is not None else 0)


def packed_nbytes(qw: QuantizedWeight, dtype: torch.dtype, *, act_order: bool) -> int:
    """Bytes of a layer's tensors (for sharding before anything is packed)."""
    (n, k), groups, bits = qw.shape, qw.scales.shape[1], qw.scheme.bits
    nbytes = 4 * n * packed_width(k, bits) + dtype.itemsize * n * groups + 8 * 2
    if not qw.scheme.sym:
        nbytes += 4 * packed_width(n, bits) * groups
    return nbytes + (4 * k if act_order else 0)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One validated linear and how it is stored: an integer layer's scale dtype (`scale_dtype` of its source
    weight) and whether it keeps its act-order g_idx; FP8 layers use neither (float32 scales, no g_idx)."""

    weight: QuantizedWeight | FP8Weight
    scale_dtype: torch.dtype = torch.float16
    act_order: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self.weight, FP8Weight):
            return fp8_tensors(self.weight)
        return pack_layer(self.weight, self.scale_dtype, act_order=self.act_order)

    def nbytes(self) -> int:
        if isinstance(self.weight, FP8Weight):
            return fp8_nbytes(self.weight)
        return packed_nbytes(self.weight, self.scale_dtype, act_order=self.act_order)


def write_compressed_tensors(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a compressed-tensors checkpoint into the existing empty directory `out_dir` and return it.

    `quantized` maps linear module names (``model.layers.0.self_attn.q_proj``) to solved weights, any mix
    of integer and FP8 schemes (ggml-block weights are refused before anything is written); linears absent
    from it stay float and are listed in `ignore`. `dense` replaces source
    tensors (see `bitsmith.formats.base.Writer`). `variant` is empty or "actorder-group" (module
    docstring). `options` is accepted for the writer protocol: act-order is seen in each layer's g_idx.
    Weights larger than `max_shard_bytes` are split into shards with an index, as transformers does.
    """
    ints, fp8 = split_layers(quantized)
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    keep_act_order = parse_variant(variant)
    check_writer_inputs(out_dir, quantized, FORMAT_NAME, max_shard_bytes=max_shard_bytes)
    config = unquantized_config(source_model_dir, markers=(QUANTIZATION_CONFIG_KEY,))
    source = scan_checkpoint(source_model_dir)
    linears = frozenset(name for name, m in model_modules(source_model_dir).items() if LINEAR_CLASS in m.classes)
    act_order = frozenset(
        name
        for name, qw in sorted(ints.items())
        if validate_layer(name, qw, source, linears, keep_act_order=keep_act_order)
    )
    for name, w in sorted(fp8.items()):
        validate_fp8_layer(name, w, source, linears)
    check_dense(source, dense or {}, quantized=quantized)

    layers = {name: _Layer(qw, scale_dtype(source[f"{name}.{WEIGHT}"]), name in act_order) for name, qw in ints.items()}
    layers.update({name: _Layer(w) for name, w in fp8.items()})  # biases keep their dtype
    write_packed_weights(out_dir, source=source, quantized=layers, pack=_Layer.tensors, packed_nbytes=_Layer.nbytes,
                         dense=dense, max_shard_bytes=max_shard_bytes, bias_dtype=None)

    ignore = sorted(linears - set(quantized))
    version = LEGACY_ACTORDER_VERSION if act_order else WRITTEN_VERSION
    qcfg = quantization_config(plan_groups(ints, act_order, fp8), ignore, version=version)
    write_json(out_dir / CONFIG_FILE, {**config, QUANTIZATION_CONFIG_KEY: qcfg})
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir
