"""Every name and number of AutoAWQ's "GEMM" safetensors layout (FORMATS.md §2), in one place.

The writer, the reader and the packing code import these; none of them restates a number.
"""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES
from bitsmith.formats.gptq.constants import DEFAULT_MAX_SHARD_BYTES as GPTQ_DEFAULT_MAX_SHARD_BYTES

QUANT_METHOD = "awq"
VERSION = "gemm"
"""The only AWQ layout bitsmith writes and reads. AutoAWQ spells it "GEMM" in its own files, transformers
writes "gemm" (and calls the field `format`); GEMV / Marlin / exllama layouts pack differently."""

BITS = 4
"""AWQ GEMM holds 4-bit codes only (`WQLinear_GEMM`, vLLM `awq`)."""
WORD_BITS = 32
PACK_FACTOR = WORD_BITS // BITS
"""Codes (and zeros) of 8 consecutive output channels share one int32 word."""
FIELD_MASK = (1 << BITS) - 1

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Field i (bits 4i..4i+3) of a word packing output channels 8c..8c+7 holds channel 8c + ORDER[i] (§2.2)."""
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)
"""The inverse of ORDER: output channel 8c + j lives in field REVERSE[j] (AutoAWQ's `AWQ_REVERSE_ORDER`)."""

GROUP_SIZES = (32, 64, 128)
"""Group sizes the writer emits: those vLLM's `awq_marlin` takes (otherwise it silently falls back to the
slower `awq` kernels) and mlx-lm's AWQ importer can re-quantize. Per-channel (-1) is refused: vLLM's
`awq` path and mlx-lm cannot load it. The reader accepts any positive size dividing in_features, and -1."""

CONFIG_FILE = "config.json"
QUANTIZATION_CONFIG_KEY = "quantization_config"
LEGACY_CONFIG_FILES = ("quant_config.json", "quantize_config.json")
"""Standalone configs of older AutoAWQ checkpoints, read (like vLLM does) when config.json has no block."""

# quantization_config keys; each tuple lists the synonyms consumers accept, the one we write first.
QUANT_METHOD_KEY = "quant_method"
BITS_KEYS = ("bits", "w_bit")
GROUP_SIZE_KEYS = ("group_size", "q_group_size")
VERSION_KEYS = ("version", "format")
ZERO_POINT_KEY = "zero_point"
MODULES_TO_NOT_CONVERT_KEY = "modules_to_not_convert"

DEFAULT_MAX_SHARD_BYTES = GPTQ_DEFAULT_MAX_SHARD_BYTES
COPIED_FILES = GPTQ_COPIED_FILES

# Tensor suffixes of one quantized linear `<prefix>` (§2.1).
WEIGHT = "weight"
QWEIGHT = "qweight"
QZEROS = "qzeros"
SCALES = "scales"
BIAS = "bias"
G_IDX = "g_idx"
QUANTIZED_SUFFIXES = (QWEIGHT, QZEROS, SCALES)

# safetensors dtype strings.
ST_INT32 = "I32"
ST_FLOAT16 = "F16"
READ_SCALE_DTYPES = ("F16", "BF16")
"""AutoAWQ writes float16 scales; vLLM loads them in the model dtype, so bfloat16 files are read too."""
READ_BIAS_DTYPES = ("F16", "BF16", "F32")
