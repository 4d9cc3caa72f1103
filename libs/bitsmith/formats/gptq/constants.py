"""Every name and number of the GPTQ safetensors layout (FORMATS.md §1), in one place.

The writer, the reader and the packing code import these; none of them restates a number.
"""

from __future__ import annotations

from enum import StrEnum

from bitsmith.schemes import SUPPORTED_BITS

QUANT_METHOD = "gptq"
PACK_DTYPE = "int32"
WORD_BITS = 32
"""Codes and zeros are packed into int32 words, LSB first, as one continuous bit stream (§1.4)."""

BITS = SUPPORTED_BITS
"""Bit widths the format (and vLLM / transformers) accept: 2, 3, 4, 8."""

THREE_BIT_ALIGN = 32
"""3-bit codes straddle words: 32 values fill exactly 3 words, so 3-bit dims must be multiples of 32."""


class CheckpointFormat(StrEnum):
    """How qzeros are stored."""

    V1 = "gptq"
    """AutoGPTQ's layout, read by everything: each stored zero field is `true zero - 1`. A true
    zero of 0 cannot be stored (it would borrow from the next field), so asymmetric v1 needs
    zeros ≥ 1 (`QuantScheme.min_zero=1`)."""
    V2 = "gptq_v2"
    """GPTQModel's layout: true zeros. Loaded by GPTQModel and recent vLLM only."""


V1_ZERO_OFFSET = 1
"""v1 stores `zero - V1_ZERO_OFFSET`; readers add it back."""

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
QUANTIZATION_CONFIG_KEY = "quantization_config"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Files copied verbatim from the source checkpoint when present."""

# Tensor suffixes of one quantized linear `<prefix>` (§1.2).
WEIGHT = "weight"
QWEIGHT = "qweight"
QZEROS = "qzeros"
SCALES = "scales"
G_IDX = "g_idx"
BIAS = "bias"
QUANTIZED_SUFFIXES = (QWEIGHT, QZEROS, SCALES, G_IDX)

# safetensors dtype strings of those tensors.
ST_INT32 = "I32"
ST_FLOAT16 = "F16"

LM_HEAD = "lm_head"
