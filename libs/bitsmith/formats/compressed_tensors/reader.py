"""Read and validate a compressed-tensors "pack-quantized" / "float-quantized" checkpoint (FORMATS.md §3, §8).

Why our own parser: the evaluator rebuilds the float model from an artifact's bytes, and artifacts
from the store or the wire are untrusted; the compressed_tensors package is a dev-only consumer, and
it asserts rather than explains. This reads what bitsmith writes and what llm-compressor writes for
weight-only int quantization (W4A16 sym/asym, group or channel, with or without an act-order
`weight_g_idx`) and for FP8 W8A8 (the FP8 and FP8_DYNAMIC presets), one or several config groups,
mixed formats included, and refuses everything else by name:

* config: every key known (QuantizationScheme / QuantizationArgs forbid extras, so do we, at every
  level); `quantization_status` "compressed"; each group "pack-quantized" or "float-quantized" (its own
  format, else the top-level one). pack-quantized groups: int weights of 2/3/4/8 bits, group or channel
  strategy, static, and no activation quantization. float-quantized groups: 8-bit float (e4m3) weights,
  symmetric, per tensor or per channel, with 8-bit float input activations, symmetric, either dynamic per
  token or static per tensor (`input_scale`). Activation quantization is allowed there, unlike for ints,
  because the dense model still reproduces the weights exactly (data·scale) and the activations are the
  runtime's to quantize: the checkpoint only tells it how (and, static, with which `input_scale`, which
  `FP8Weight` carries). Anything a float model could not stand in for is `UnsupportedError`: block or
  group FP8 weights, int8 or asymmetric or other-strategy activations, output activations, KV-cache,
  sparsity or transform quantization;
* which modules are quantized: compressed-tensors' target / ignore rules (`matching`) over the modules
  of the model that config.json describes (built on the meta device); exactly those Linear/Embedding
  modules must carry `weight_packed` & co. (or an FP8 `weight`, `weight_scale`, `input_scale`), and no
  other tensor may;
* tensors, from the headers before anything is loaded: dtypes and shapes against the module's weight
  shape and its group's grid (packing by the writer's version: 3-bit changed layout in 0.18.0); then
  `weight_shape` values, finite scales, g_idx ranges and group sizes; FP8 scales finite and > 0, no NaN
  in FP8 data.

Anything malformed is a `FormatError` naming the file, group or tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.base import dense_state, read_json_object
from bitsmith.formats.compressed_tensors.constants import (
    ACTORDER_GROUP_ALIASES,
    ACTORDER_NO_G_IDX,
    ARGS_KEYS,
    BITS,
    COMPRESSED,
    COMPRESSION_FORMATS,
    CONFIG_FILE,
    DENSE,
    DENSE_PACKING_SINCE,
    FLOAT,
    FLOAT_QUANTIZED,
    FP8_BITS,
    G_IDX_DTYPES,
    INPUT_SCALE,
    INPUT_ZERO_POINT,
    INT,
    INT_ONLY_SUFFIXES,
    MIXED_PRECISION,
    PACK_QUANTIZED,
    QUANT_METHOD,
    QUANTIZABLE_CLASSES,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZATION_STATUSES,
    QUANTIZED_SUFFIXES,
    SCALE_DTYPES,
    SCHEME_KEYS,
    SHAPE_DTYPES,
    ST_FP8_E4M3,
    ST_INT32,
    STRATEGY_CHANNEL,
    STRATEGY_GROUP,
    STRATEGY_TENSOR,
    STRATEGY_TOKEN,
    TOP_LEVEL_KEYS,
    TORCH_DTYPE_NAMES,
    WEIGHT,
    WEIGHT_G_IDX,
    WEIGHT_PACKED,
    WEIGHT_SCALE,
    WEIGHT_SHAPE,
    WEIGHT_ZERO_POINT,
    WORD_BITS,
)
from bitsmith.formats.compressed_tensors.matching import ModuleInfo, model_modules, resolve_group
from bitsmith.formats.compressed_tensors.packing import packed_width, unpack_rows
from bitsmith.formats.safetensors_io import TensorInfo, load_tensors, scan_checkpoint
from bitsmith.quantized import FP8Weight, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, FP8Scheme, QuantScheme

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_UNSUPPORTED_STRATEGIES = frozenset({"tensor", "block", "token", "tensor_group", "attn_head"})


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightArgs:
    """The weight grid of one config group, as far as dequantization needs it."""

    bits: int
    group_size: int
    """Columns per group, or -1 (`PER_CHANNEL`) for the channel strategy."""
    sym: bool
    act_order: bool
    """Whether modules carry `weight_g_idx` (actorder "group")."""
    scale_dtype: str | None = None
    """safetensors dtype the config declares for scales (`scale_dtype`), if it does."""

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym)


@dataclass(frozen=True, slots=True, kw_only=True)
class FP8Args:
    """The FP8 grid of one "float-quantized" config group: weight scale layout and activation scaling."""

    per_channel: bool
    """Weight strategy "channel" (one scale per output row), else "tensor"."""
    static_activations: bool
    """Input activations static per tensor (modules carry `input_scale`), else dynamic per token."""
    scale_dtype: str | None = None
    """safetensors dtype the config declares for scales (`scale_dtype`), if it does."""

    @property
    def scheme(self) -> FP8Scheme:
        return FP8Scheme(per_channel=self.per_channel, static_activations=self.static_activations)


GroupArgs = WeightArgs | FP8Args


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedConfig:
    """A validated `quantization_config`: group grids, their targets, the ignore list, the writer version."""

    groups: Mapping[str, GroupArgs]
    targets: Mapping[str, tuple[str, ...]]
    ignore: tuple[str, ...]
    version: tuple[int, int, int] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressedTensorsCheckpoint:
    """A validated compressed-tensors checkpoint.

    `quantized` holds, for pack-quantized modules, bitsmith's unsigned codes and zeros (stored value =
    signed value + 2^(b-1)) with float32 scales equal to the stored ones, and for float-quantized modules
    an `FP8Weight` with the stored e4m3 data and float32 copies of the stored scales (`input_scale` too);
    `layer_groups` names each module's config group.
    """

    path: Path
    config: Mapping[str, Any]
    quantization_config: Mapping[str, Any]
    parsed: ParsedConfig
    layer_groups: Mapping[str, str]
    quantized: Mapping[str, QuantizedWeight | FP8Weight]
    scale_dtypes: Mapping[str, torch.dtype]
    tensors: Mapping[str, torch.Tensor]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict: each quantized module's `.weight` is (code - zero)·scale, or data·scale
        for FP8 modules (activation scales play no part: the runtime applies them).

        The integer product is exact in float32 (a ≤ 9-bit integer times a ≤ 24-bit scale), then rounded
        once to `dtype` — what compressed-tensors computes when `dtype` is the scale dtype. The FP8 product
        is the float32 one compressed-tensors computes for float32 scales (what bitsmith writes), and for
        bf16/fp16 scales (llm-compressor's) it is exact (4 + 11 significant bits), so rounding it to the
        scale dtype again gives compressed-tensors' result.
        """
        return dense_state(self.tensors, self.quantized, dtype)


# --- config -----------------------------------------------------------------------------------------


def _unknown(where: str, data: Mapping[str, Any], known: frozenset[str]) -> None:
    if extra := sorted(set(data) - known):
        raise FormatError(f"{where}: unknown keys {extra}")


def parse_version(value: Any, where: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a compressed-tensors version string such as "0.12.3.a20251015"."""
    if value is None:
        return None
    match = _VERSION.match(value) if isinstance(value, str) else None
    if match is None:
        raise FormatError(f"{where}: version {value!r} is not a compressed-tensors version")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def _check_empty(where: str, key: str, value: Any, *, allowed: bool) -> None:
    if value is None or value == {} or allowed:
        return
    raise UnsupportedError(f"{where}: {key} {value!r} is not supported (bitsmith reads weight-only quantization)")


def parse_weight_args(raw: Any, where: str) -> WeightArgs:
    """Validate one group's `weights` QuantizationArgs (defaults and inference as compressed-tensors')."""
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: weights must be an object, got {raw!r}")
    _unknown(where, raw, ARGS_KEYS)
    qtype = raw.get("type", INT)
    if not isinstance(qtype, str) or qtype.lower() not in (INT, "float"):
        raise FormatError(f"{where}: type must be 'int' or 'float', got {qtype!r}")
    if qtype.lower() != INT:
        raise UnsupportedError(f"{where}: {qtype} weights are not pack-quantized integers")
    bits = raw.get("num_bits", 8)
    if type(bits) is not int or not 1 <= bits <= WORD_BITS:
        raise FormatError(f"{where}: num_bits must be an integer in [1, 32], got {bits!r}")
    if bits not in BITS:
        raise UnsupportedError(f"{where}: {bits}-bit weights; bitsmith reads {list(BITS)}-bit")
    sym = raw.get("symmetric", True)
    if type(sym) is not bool:
        raise FormatError(f"{where}: symmetric must be true/false, got {sym!r}")
    group_size, strategy = raw.get("group_size"), raw.get("strategy")
    if group_size is not None and (type(group_size) is not int or group_size < PER_CHANNEL or group_size == 0):
        raise FormatError(f"{where}: group_size must be null, -1 or positive, got {group_size!r}")
    if strategy is None:
        strategy = "tensor" if group_size is None else STRATEGY_GROUP if group_size > 0 else STRATEGY_CHANNEL
    if not isinstance(strategy, str):
        raise FormatError(f"{where}: strategy must be a string, got {strategy!r}")
    strategy = strategy.lower()
    if strategy in _UNSUPPORTED_STRATEGIES:
        raise UnsupportedError(f"{where}: strategy {strategy!r}; pack-quantized reading supports group and channel")
    size = PER_CHANNEL
    if strategy == STRATEGY_GROUP:
        if group_size is None or group_size <= 0:
            raise FormatError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}")
        size = group_size
    if strategy == STRATEGY_CHANNEL and group_size is not None and group_size > 0:
        raise FormatError(f"{where}: group_size {group_size} requires strategy 'group', not 'channel'")
    if strategy not in (STRATEGY_GROUP, STRATEGY_CHANNEL):
        raise FormatError(f"{where}: unknown strategy {strategy!r}")
    if raw.get("block_structure") is not None:
        raise FormatError(f"{where}: block_structure requires strategy 'block'")
    if raw.get("dynamic", False) is not False:
        raise UnsupportedError(f"{where}: dynamic weight quantization ({raw['dynamic']!r})")
    actorder = raw.get("actorder")
    if actorder is True or (isinstance(actorder, str) and actorder.lower() in ACTORDER_GROUP_ALIASES):
        act_order = True
    elif actorder in (None, False) or (isinstance(actorder, str) and actorder.lower() in ACTORDER_NO_G_IDX):
        act_order = False
    else:
        raise FormatError(f"{where}: unknown actorder {actorder!r}")
    scale_dtype = raw.get("scale_dtype")
    if scale_dtype is not None and (not isinstance(scale_dtype, str) or scale_dtype not in TORCH_DTYPE_NAMES):
        raise UnsupportedError(f"{where}: scale_dtype {scale_dtype!r}; readable: {sorted(TORCH_DTYPE_NAMES)}")
    for key, kind in (("observer", str), ("zp_dtype", str), ("observer_kwargs", dict)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise FormatError(f"{where}: {key} must be a {kind.__name__} or null, got {raw[key]!r}")
    return WeightArgs(
        bits=bits,
        group_size=size,
        sym=sym,
        act_order=act_order,
        scale_dtype=TORCH_DTYPE_NAMES[scale_dtype] if scale_dtype is not None else None,
    )


def _fp8_common(raw: Any, where: str, what: str) -> tuple[str, Any]:
    """Checks shared by FP8 weights and activations: e4m3, symmetric; returns (strategy, dynamic).

    The strategy is compressed-tensors' own inference when absent (group_size null → tensor, -1 →
    channel, > 0 → group)."""
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: {what} must be an object, got {raw!r}")
    _unknown(where, raw, ARGS_KEYS)
    qtype = raw.get("type", INT)
    if not isinstance(qtype, str) or qtype.lower() not in (INT, FLOAT):
        raise FormatError(f"{where}: type must be 'int' or 'float', got {qtype!r}")
    bits = raw.get("num_bits", 8)
    if type(bits) is not int or not 1 <= bits <= WORD_BITS:
        raise FormatError(f"{where}: num_bits must be an integer in [1, 32], got {bits!r}")
    if qtype.lower() != FLOAT or bits != FP8_BITS:
        raise UnsupportedError(f"{where}: {bits}-bit {qtype} {what}; float-quantized reading takes 8-bit float (FP8)")
    if raw.get("symmetric", True) is not True:
        raise UnsupportedError(f"{where}: asymmetric FP8 {what} (symmetric={raw.get('symmetric')!r})")
    group_size, strategy = raw.get("group_size"), raw.get("strategy")
    if group_size is not None and (type(group_size) is not int or group_size < PER_CHANNEL or group_size == 0):
        raise FormatError(f"{where}: group_size must be null, -1 or positive, got {group_size!r}")
    if strategy is None:
        strategy = STRATEGY_TENSOR if group_size is None else STRATEGY_GROUP if group_size > 0 else STRATEGY_CHANNEL
    if not isinstance(strategy, str):
        raise FormatError(f"{where}: strategy must be a string, got {strategy!r}")
    strategy = strategy.lower()
    if strategy not in _UNSUPPORTED_STRATEGIES | {STRATEGY_GROUP, STRATEGY_CHANNEL}:
        raise FormatError(f"{where}: unknown strategy {strategy!r}")
    if group_size is not None and group_size > 0:
        raise UnsupportedError(f"{where}: FP8 {what} in groups of {group_size}; read: per tensor, channel or token")
    if raw.get("block_structure") is not None:
        raise UnsupportedError(f"{where}: block-quantized FP8 {what} (block_structure {raw['block_structure']!r})")
    if raw.get("actorder") not in (None, False):
        raise FormatError(f"{where}: actorder {raw['actorder']!r} applies only to group-quantized weights")
    for key, kind in (("observer", str), ("zp_dtype", str), ("observer_kwargs", dict)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise FormatError(f"{where}: {key} must be a {kind.__name__} or null, got {raw[key]!r}")
    return strategy, raw.get("dynamic", False)


def parse_fp8_args(weights: Any, inputs: Any, where: str) -> FP8Args:
    """Validate a float-quantized group's `weights` and `input_activations` (FP8 W8A8: module docstring)."""
    strategy, dynamic = _fp8_common(weights, f"{where}.weights", "weights")
    if strategy not in (STRATEGY_TENSOR, STRATEGY_CHANNEL):
        raise UnsupportedError(
            f"{where}.weights: strategy {strategy!r}; float-quantized reading supports tensor and channel"
        )
    if dynamic is not False:
        raise UnsupportedError(f"{where}.weights: dynamic weight quantization ({dynamic!r})")
    scale_dtype = weights.get("scale_dtype")
    if scale_dtype is not None and (not isinstance(scale_dtype, str) or scale_dtype not in TORCH_DTYPE_NAMES):
        raise UnsupportedError(f"{where}.weights: scale_dtype {scale_dtype!r}; readable: {sorted(TORCH_DTYPE_NAMES)}")
    if inputs is None:
        raise UnsupportedError(
            f"{where}: float-quantized weights without input_activations (weight-only FP8); read: FP8 W8A8"
        )
    in_where = f"{where}.input_activations"
    in_strategy, in_dynamic = _fp8_common(inputs, in_where, "input_activations")
    if (in_strategy, in_dynamic) == (STRATEGY_TOKEN, True):
        static = False
    elif (in_strategy, in_dynamic) == (STRATEGY_TENSOR, False):
        static = True
    else:
        raise UnsupportedError(
            f"{in_where}: strategy {in_strategy!r} with dynamic={in_dynamic!r}; read: dynamic per 'token' "
            "or static per 'tensor'"
        )
    return FP8Args(
        per_channel=strategy == STRATEGY_CHANNEL,
        static_activations=static,
        scale_dtype=TORCH_DTYPE_NAMES[scale_dtype] if scale_dtype is not None else None,
    )


def _parse_group(name: str, raw: Any, default_format: Any, where: str) -> tuple[GroupArgs, tuple[str, ...]]:
    where = f"{where}: config group {name!r}"
    if isinstance(raw, list):
        raise UnsupportedError(f"{where}: preset scheme references are not supported; write the scheme out")
    if not isinstance(raw, dict):
        raise FormatError(f"{where} must be an object")
    _unknown(where, raw, SCHEME_KEYS)
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise FormatError(f"{where}: targets must be a non-empty list of strings, got {targets!r}")
    if (raw.get("format") or default_format) == FLOAT_QUANTIZED:
        if raw.get("output_activations") is not None:
            raise UnsupportedError(f"{where}: output_activations are quantized; bitsmith reads FP8 W8A8 only")
        if raw.get("weights") is None:
            raise UnsupportedError(f"{where}: no weight quantization")
        return parse_fp8_args(raw["weights"], raw.get("input_activations"), where), tuple(targets)
    for key in ("input_activations", "output_activations"):
        if raw.get(key) is not None:
            raise UnsupportedError(f"{where}: {key} are quantized; a float model cannot reproduce that")
    if raw.get("weights") is None:
        raise UnsupportedError(f"{where}: no weight quantization")
    fmt = raw.get("format") or default_format
    if fmt is None or fmt == MIXED_PRECISION:
        raise FormatError(f"{where}: no format (top-level format is {default_format!r})")
    if not isinstance(fmt, str) or fmt not in COMPRESSION_FORMATS:
        raise FormatError(f"{where}: unknown format {fmt!r}")
    if fmt != PACK_QUANTIZED:
        raise UnsupportedError(f"{where}: format {fmt!r}; bitsmith reads {PACK_QUANTIZED!r} and {FLOAT_QUANTIZED!r}")
    return parse_weight_args(raw["weights"], f"{where}.weights"), tuple(targets)


def parse_quantization_config(qcfg: Mapping[str, Any], where: str) -> ParsedConfig:
    """Validate a `quantization_config` object (see the module docstring for what is refused)."""
    _unknown(where, qcfg, TOP_LEVEL_KEYS)
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{where}: quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    status = qcfg.get("quantization_status")
    if not isinstance(status, str) or status not in QUANTIZATION_STATUSES:
        raise FormatError(f"{where}: unknown quantization_status {status!r}")
    if status != COMPRESSED:
        raise UnsupportedError(f"{where}: quantization_status {status!r}; only {COMPRESSED!r} weights are read")
    fmt = qcfg.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in COMPRESSION_FORMATS):
        raise FormatError(f"{where}: unknown format {fmt!r}")
    _check_empty(where, "kv_cache_scheme", qcfg.get("kv_cache_scheme"), allowed=False)
    _check_empty(where, "moe_sparsity_config", qcfg.get("moe_sparsity_config"), allowed=False)
    sparsity = qcfg.get("sparsity_config")
    dense_sparsity = isinstance(sparsity, dict) and sparsity.get("format") == DENSE
    _check_empty(where, "sparsity_config", sparsity, allowed=dense_sparsity)
    transform = qcfg.get("transform_config")
    no_transform = isinstance(transform, dict) and not transform.get("config_groups")
    _check_empty(where, "transform_config", transform, allowed=no_transform)
    ratio = qcfg.get("global_compression_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float)):
        raise FormatError(f"{where}: global_compression_ratio must be a number or null, got {ratio!r}")
    ignore = qcfg.get("ignore")
    ignore = [] if ignore is None else ignore
    if not isinstance(ignore, list) or not all(isinstance(entry, str) for entry in ignore):
        raise FormatError(f"{where}: ignore must be a list of strings, got {ignore!r}")
    raw_groups = qcfg.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise FormatError(f"{where}: config_groups must be a non-empty object")
    groups: dict[str, GroupArgs] = {}
    targets: dict[str, tuple[str, ...]] = {}
    for name, raw in raw_groups.items():
        groups[name], targets[name] = _parse_group(name, raw, fmt, where)
    version = parse_version(qcfg.get("version"), where)
    int_groups = [args for args in groups.values() if isinstance(args, WeightArgs)]
    if version is None and any(WORD_BITS % args.bits for args in int_groups):
        widths = sorted({args.bits for args in int_groups})
        raise FormatError(f"{where}: no version, so the packing of {widths}-bit codes is unknown")
    return ParsedConfig(groups=groups, targets=targets, ignore=tuple(ignore), version=version)


# --- tensors ----------------------------------------------------------------------------------------


def _expect(
    info: TensorInfo | None, where: str, dtypes: frozenset[str] | set[str], shape: tuple[int, ...]
) -> TensorInfo:
    if info is None:
        raise FormatError(f"{where} is missing")
    if info.dtype not in dtypes or info.shape != shape:
        expected = f"{'/'.join(sorted(dtypes))} {list(shape)}"
        raise FormatError(f"{where} ({info.file.name}) is {info.dtype} {list(info.shape)}, expected {expected}")
    return info


def _layer_infos(
    prefix: str, infos: Mapping[str, TensorInfo], args: WeightArgs, module: ModuleInfo, *, legacy: bool
) -> tuple[dict[str, TensorInfo], tuple[int, int]]:
    """Header checks of one module's tensors against its weight shape [N, K] and grid (nothing loaded yet)."""
    where = f"module {prefix!r}"
    if module.weight_shape is None or len(module.weight_shape) != 2:
        raise FormatError(f"{where}: the model has no 2-D weight there to quantize")
    n, k = module.weight_shape
    group_size = k if args.group_size == PER_CHANNEL else args.group_size
    if k % group_size:
        raise UnsupportedError(f"{where}: group_size {group_size} does not divide in_features {k}")
    groups = k // group_size
    scale_dtypes = {args.scale_dtype} if args.scale_dtype else set(SCALE_DTYPES)
    expected: dict[str, tuple[frozenset[str] | set[str], tuple[int, ...]]] = {
        WEIGHT_PACKED: ({ST_INT32}, (n, packed_width(k, args.bits, legacy=legacy))),
        WEIGHT_SCALE: (scale_dtypes, (n, groups)),
        WEIGHT_SHAPE: (SHAPE_DTYPES, (2,)),
    }
    checked = {
        suffix: _expect(infos.get(f"{prefix}.{suffix}"), f"{where}.{suffix}", dtypes, shape)
        for suffix, (dtypes, shape) in expected.items()
    }
    zero_point, g_idx = infos.get(f"{prefix}.{WEIGHT_ZERO_POINT}"), infos.get(f"{prefix}.{WEIGHT_G_IDX}")
    if not args.sym:
        shape = (packed_width(n, args.bits, legacy=legacy), groups)
        checked[WEIGHT_ZERO_POINT] = _expect(zero_point, f"{where}.{WEIGHT_ZERO_POINT}", {ST_INT32}, shape)
    elif zero_point is not None:
        raise FormatError(f"{where}: {WEIGHT_ZERO_POINT} present but the group is symmetric")
    if args.act_order:
        checked[WEIGHT_G_IDX] = _expect(g_idx, f"{where}.{WEIGHT_G_IDX}", G_IDX_DTYPES, (k,))
    elif g_idx is not None:
        raise FormatError(f"{where}: {WEIGHT_G_IDX} present but the group's actorder is not 'group'")
    if f"{prefix}.{WEIGHT}" in infos:
        raise FormatError(f"{where}: a float {WEIGHT} remains beside {WEIGHT_PACKED}")
    return checked, (n, k)


def _fp8_layer_infos(
    prefix: str, infos: Mapping[str, TensorInfo], args: FP8Args, module: ModuleInfo
) -> tuple[dict[str, TensorInfo], tuple[int, int]]:
    """Header checks of one FP8 module: `weight` F8_E4M3 [N, K]; `weight_scale` [N, 1] or [N] (channel),
    [1] or 0-dim (tensor); `input_scale` [1] or 0-dim iff static. Scales may be F32 (bitsmith) or the
    weight dtype (llm-compressor); both shapes of each appear in files llm-compressor has written."""
    where = f"module {prefix!r}"
    if module.weight_shape is None or len(module.weight_shape) != 2:
        raise FormatError(f"{where}: the model has no 2-D weight there to quantize")
    n, k = module.weight_shape
    checked = {WEIGHT: _expect(infos.get(f"{prefix}.{WEIGHT}"), f"{where}.{WEIGHT}", {ST_FP8_E4M3}, (n, k))}
    scale_dtypes = {args.scale_dtype} if args.scale_dtype else set(SCALE_DTYPES)
    scale_shapes: tuple[tuple[int, ...], ...] = ((n, 1), (n,)) if args.per_channel else ((1,), ())
    scale = _expect_one_of(infos.get(f"{prefix}.{WEIGHT_SCALE}"), f"{where}.{WEIGHT_SCALE}", scale_dtypes, scale_shapes)
    checked[WEIGHT_SCALE] = scale
    input_scale = infos.get(f"{prefix}.{INPUT_SCALE}")
    if args.static_activations:
        checked[INPUT_SCALE] = _expect_one_of(input_scale, f"{where}.{INPUT_SCALE}", set(SCALE_DTYPES), ((1,), ()))
    elif input_scale is not None:
        raise FormatError(f"{where}: {INPUT_SCALE} present but the group's activations are dynamic")
    for suffix in (*INT_ONLY_SUFFIXES, INPUT_ZERO_POINT):
        if f"{prefix}.{suffix}" in infos:
            raise FormatError(f"{where}: {suffix} present in a float-quantized (FP8) module")
    return checked, (n, k)


def _expect_one_of(
    info: TensorInfo | None, where: str, dtypes: frozenset[str] | set[str], shapes: tuple[tuple[int, ...], ...]
) -> TensorInfo:
    if info is None:
        raise FormatError(f"{where} is missing")
    if info.dtype not in dtypes or info.shape not in shapes:
        expected = f"{'/'.join(sorted(dtypes))} {' or '.join(str(list(s)) for s in shapes)}"
        raise FormatError(f"{where} ({info.file.name}) is {info.dtype} {list(info.shape)}, expected {expected}")
    return info


def unpack_fp8_layer(prefix: str, tensors: Mapping[str, torch.Tensor], args: FP8Args) -> FP8Weight:
    """bitsmith's FP8Weight from one module's tensors: the e4m3 data as stored, float32 copies of the scales."""
    where = f"module {prefix!r}"
    data = tensors[WEIGHT]
    # e4m3fn has no infinities; its NaNs are the bit patterns s.1111.111.
    if bool(((data.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise FormatError(f"{where}.{WEIGHT} contains NaN")
    scale = tensors[WEIGHT_SCALE].float().reshape(-1).contiguous()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise FormatError(f"{where}.{WEIGHT_SCALE} must be finite and > 0")
    input_scale = None
    if args.static_activations:
        input_scale = tensors[INPUT_SCALE].float().reshape(1).contiguous()
        if not bool(torch.isfinite(input_scale).all()) or bool((input_scale <= 0).any()):
            raise FormatError(f"{where}.{INPUT_SCALE} must be finite and > 0")
    return FP8Weight(data=data.contiguous(), scale=scale, scheme=args.scheme, input_scale=input_scale)


def unpack_layer(
    prefix: str, tensors: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int], *, legacy: bool
) -> QuantizedWeight:
    """bitsmith's QuantizedWeight (unsigned codes and zeros, float32 scales) from one module's tensors."""
    where = f"module {prefix!r}"
    n, k = shape
    if tensors[WEIGHT_SHAPE].tolist() != [n, k]:
        stored = tensors[WEIGHT_SHAPE].tolist()
        raise FormatError(f"{where}.{WEIGHT_SHAPE} is {stored}, the module's weight is {[n, k]}")
    scales = tensors[WEIGHT_SCALE]
    if not torch.isfinite(scales).all():
        raise FormatError(f"{where}.{WEIGHT_SCALE} is not finite")
    groups = scales.shape[1]
    group_size = k // groups
    trivial = torch.arange(k, dtype=torch.int64) // group_size
    if args.act_order:
        g_idx = tensors[WEIGHT_G_IDX].to(torch.int64)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise FormatError(f"{where}.{WEIGHT_G_IDX} has values outside [0, {groups})")
        if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.bincount(trivial, minlength=groups)):
            raise FormatError(f"{where}.{WEIGHT_G_IDX} does not put group_size={group_size} columns in every group")
    else:
        g_idx = trivial
    codes = unpack_rows(tensors[WEIGHT_PACKED], args.bits, k, legacy=legacy)
    if args.sym:
        zeros = torch.full((n, groups), 1 << (args.bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_rows(tensors[WEIGHT_ZERO_POINT].t().contiguous(), args.bits, n, legacy=legacy).t()
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.float().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=g_idx.to(torch.int32),
        scheme=args.scheme,
    )


def read_compressed_tensors(path: Path) -> CompressedTensorsCheckpoint:
    """Read and validate the compressed-tensors checkpoint at `path`; `FormatError` if anything is off."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    config = read_json_object(config_path, missing=f"compressed-tensors checkpoint {path} has no {CONFIG_FILE}")
    qcfg = config.get(QUANTIZATION_CONFIG_KEY)
    if not isinstance(qcfg, dict):
        raise FormatError(f"{config_path}: {QUANTIZATION_CONFIG_KEY} is missing or not an object")
    parsed = parse_quantization_config(qcfg, f"{config_path}: {QUANTIZATION_CONFIG_KEY}")
    legacy = parsed.version is not None and parsed.version < DENSE_PACKING_SINCE
    infos = scan_checkpoint(path)
    modules = model_modules(path)

    layer_groups: dict[str, str] = {}
    for name, module in modules.items():
        if QUANTIZABLE_CLASSES.isdisjoint(module.classes):
            continue
        group = resolve_group(name, module.classes, parsed.targets, parsed.ignore)
        if group is not None:
            layer_groups[name] = group
    layer_infos: dict[str, dict[str, TensorInfo]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for prefix, group in sorted(layer_groups.items()):
        args = parsed.groups[group]
        if isinstance(args, FP8Args):
            layer_infos[prefix], shapes[prefix] = _fp8_layer_infos(prefix, infos, args, modules[prefix])
        else:
            layer_infos[prefix], shapes[prefix] = _layer_infos(prefix, infos, args, modules[prefix], legacy=legacy)
    owned = {info.name for parts in layer_infos.values() for info in parts.values()}
    stray = sorted(n for n in set(infos) - owned if n.rpartition(".")[2] in QUANTIZED_SUFFIXES)
    if stray:
        raise FormatError(
            f"compressed-tensors checkpoint {path}: {stray[0]} belongs to no module that a config group quantizes"
        )
    loaded = load_tensors(info for parts in layer_infos.values() for info in parts.values())
    quantized: dict[str, QuantizedWeight | FP8Weight] = {}
    scale_dtypes: dict[str, torch.dtype] = {}
    for prefix, parts in layer_infos.items():
        layer = {suffix: loaded[info.name] for suffix, info in parts.items()}
        args = parsed.groups[layer_groups[prefix]]
        if isinstance(args, FP8Args):
            quantized[prefix] = unpack_fp8_layer(prefix, layer, args)
        else:
            quantized[prefix] = unpack_layer(prefix, layer, args, shapes[prefix], legacy=legacy)
        scale_dtypes[prefix] = layer[WEIGHT_SCALE].dtype
    tensors = load_tensors(infos[name] for name in sorted(set(infos) - owned))
    return CompressedTensorsCheckpoint(
        path=path,
        config=config,
        quantization_config=qcfg,
        parsed=parsed,
        layer_groups=layer_groups,
        quantized=quantized,
        scale_dtypes=scale_dtypes,
        tensors=tensors,
    )
