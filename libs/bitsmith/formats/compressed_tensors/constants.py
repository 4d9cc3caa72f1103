"""Every name and number of compressed-tensors' "pack-quantized" and "float-quantized" layouts (FORMATS.md §3).

The writer, the reader, the packing and the target matching import these; none restates a number.
Version facts were read from the compressed-tensors releases themselves (0.17.1, 0.18.0, 0.19.0,
0.20.0): see `DENSE_PACKING_SINCE` and `ACTORDER_GROUP_REMOVED_IN`.
"""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES
from bitsmith.schemes import SUPPORTED_BITS

QUANT_METHOD = "compressed-tensors"
CONFIG_FILE = "config.json"
QUANTIZATION_CONFIG_KEY = "quantization_config"
COPIED_FILES = GPTQ_COPIED_FILES
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

WRITTEN_VERSION = "0.20.0"
"""The compressed-tensors release whose layout and config schema the default writer follows (and the
one pinned in the dev dependencies, which a test checks): dense packing, no `actorder: "group"`."""
LEGACY_ACTORDER_VERSION = "0.18.0"
"""Written by the "actorder-group" variant: the last release that has both dense packing and
`actorder: "group"` with `weight_g_idx`."""
DENSE_PACKING_SINCE = (0, 18, 0)
"""From 0.18.0 on, values are one continuous little-endian bit stream per row (32 values of b bits
fill exactly b words; 3-bit values straddle words). Up to 0.17.x every word held 32 // b whole values
(3-bit: 10 per word, 2 bits unused). The two layouts differ only for widths that do not divide 32."""
ACTORDER_GROUP_REMOVED_IN = (0, 19, 0)
"""From 0.19.0 on, `QuantizationArgs` rejects `actorder: "group"` (and its alias "dynamic", and
`true`): a config carrying it does not even parse, and the decompressor no longer reads `weight_g_idx`."""

BITS = SUPPORTED_BITS
"""Widths written and read: compressed-tensors 0.20.0 packs and decompresses 1..8 bits exactly
(checked for 2/3/4/8, sym and asym, group and channel, by the consumer test); bitsmith's grids are
2/3/4/8. vLLM's WNA16 kernels take only 4 and 8 of them."""
WORD_BITS = 32

# Config values.
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
"""FP8 W8A8 (llm-compressor's FP8 / FP8_DYNAMIC presets): unpacked float8_e4m3fn weights, activations
cast to FP8 by the runtime (vLLM's CompressedTensorsW8A8Fp8)."""
MIXED_PRECISION = "mixed-precision"
"""Top-level `format` when the groups use more than one format (each group then names its own)."""
DENSE = "dense"
COMPRESSED = "compressed"
INT = "int"
FLOAT = "float"
FP8_BITS = 8
"""`num_bits` of FP8 weights and activations; "float" with 8 bits means e4m3 (compressed-tensors has
no e5m2 weights)."""
STRATEGY_GROUP = "group"
STRATEGY_CHANNEL = "channel"
STRATEGY_TENSOR = "tensor"
STRATEGY_TOKEN = "token"
OBSERVER_MINMAX = "minmax"
"""The observer a static activation scale was calibrated with, as llm-compressor's FP8 preset names it."""
ACTORDER_GROUP = "group"
ACTORDER_GROUP_ALIASES = frozenset({"group", "dynamic"})
"""Values of `actorder` that mean columns are grouped by `weight_g_idx` (old files also wrote `true`)."""
ACTORDER_NO_G_IDX = frozenset({"weight", "static"})
"""Values that only changed the calibration order: groups stay contiguous, no `weight_g_idx`."""
GROUP_NAME = "group_{index}"
LINEAR_CLASS = "Linear"
"""Class-name target; a module matches it when any class of its MRO is named so."""
QUANTIZABLE_CLASSES = frozenset({"Linear", "Embedding"})
"""Module classes compressed-tensors attaches a weight scheme to (`apply_quantization_config`)."""
REGEX_PREFIX = "re:"

QUANTIZATION_STATUSES = frozenset({"initialized", "calibration", "frozen", "compressed", "decompressed"})
COMPRESSION_FORMATS = frozenset({
    "dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized",
    "naive-quantized", "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized",
    "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized", "fakequant",
})  # fmt: skip
"""Every `format` compressed-tensors knows; any but pack-quantized and float-quantized is refused as unsupported."""

# Keys of the config objects. QuantizationScheme and QuantizationArgs forbid extra keys; we do the same
# at every level, since a key we do not know may change what the tensors mean.
TOP_LEVEL_KEYS = frozenset({
    "config_groups", "format", "quantization_status", "ignore", "kv_cache_scheme", "global_compression_ratio",
    "quant_method", "version", "sparsity_config", "transform_config", "moe_sparsity_config",
})  # fmt: skip
SCHEME_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
ARGS_KEYS = frozenset({
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
    "observer", "observer_kwargs", "scale_dtype", "zp_dtype",
})  # fmt: skip

# Tensor suffixes of one quantized module `<prefix>` (§3.3).
WEIGHT = "weight"
WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_ZERO_POINT = "weight_zero_point"
WEIGHT_SHAPE = "weight_shape"
WEIGHT_G_IDX = "weight_g_idx"
INPUT_SCALE = "input_scale"
"""Static FP8 activations: the calibrated per-tensor scale the runtime divides inputs by."""
INPUT_ZERO_POINT = "input_zero_point"
INT_ONLY_SUFFIXES = (WEIGHT_PACKED, WEIGHT_ZERO_POINT, WEIGHT_SHAPE, WEIGHT_G_IDX)
"""Tensors only a pack-quantized module has; an FP8 module carrying one is malformed."""
QUANTIZED_SUFFIXES = (*INT_ONLY_SUFFIXES, WEIGHT_SCALE, INPUT_SCALE, INPUT_ZERO_POINT)
"""Suffixes that only a quantized module may carry: one left over elsewhere means a mismatched config."""

# safetensors dtype strings.
ST_INT32 = "I32"
ST_INT64 = "I64"
ST_FP8_E4M3 = "F8_E4M3"
"""float8_e4m3fn as safetensors names it: the dtype of an FP8 module's `weight`."""
ST_FLOAT32 = "F32"
SHAPE_DTYPES = frozenset({ST_INT32, ST_INT64})
"""`weight_shape` is `torch.tensor(weight.shape)`, i.e. int64; the docs' table says int32; read both."""
G_IDX_DTYPES = frozenset({ST_INT32, ST_INT64})
SCALE_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
"""Scale dtypes read and written (safetensors string → torch attribute name)."""
FALLBACK_SCALE_DTYPE = "F16"
"""compressed-tensors 0.20.0 stores scales in the weight's dtype when it is bf16/fp16/fp32, else fp16."""
TORCH_DTYPE_NAMES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}
"""How `scale_dtype` is spelled in a config (compressed-tensors serializes `str(torch.dtype)`)."""

VARIANT_ACTORDER_GROUP = "actorder-group"
"""Writer variant: keep act-order layers (non-trivial g_idx) as `weight_g_idx` + `actorder: "group"`,
declaring `LEGACY_ACTORDER_VERSION` when any layer needs it. Such a file loads only with
compressed-tensors 0.18 (2/4/8-bit also with older releases, e.g. the ones vLLM builds pin);
compressed-tensors ≥ 0.19 refuses its config. Without act-order layers the output is the default one."""
VARIANTS = (VARIANT_ACTORDER_GROUP,)
