"""Every name and number of NVIDIA ModelOpt's "unified HF" checkpoint (FORMATS.md §4.1), in one place.

The writer, the reader, the packing code and the TensorRT-LLM package import these; none restates one.
"""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES
from bitsmith.formats.gptq.constants import DEFAULT_MAX_SHARD_BYTES as GPTQ_DEFAULT_MAX_SHARD_BYTES

QUANT_METHOD = "modelopt"
"""`config.json` `quantization_config.quant_method`: what transformers / vLLM dispatch on, and what
`bitsmith.runtimes.artifact_format` maps back to `Format.MODELOPT`."""
PRODUCER = "bitsmith"
"""`producer.name`: ModelOpt writes "modelopt"; consumers read only `quantization`, so we name ourselves."""

HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
CONFIG_FILE = "config.json"
QUANTIZATION_CONFIG_KEY = "quantization_config"
QUANTIZATION_KEY = "quantization"
PRODUCER_KEY = "producer"

# hf_quant_config.json["quantization"] keys (MO-qu `get_quant_config`).
QUANT_ALGO_KEY = "quant_algo"
KV_CACHE_QUANT_ALGO_KEY = "kv_cache_quant_algo"
EXCLUDE_MODULES_KEY = "exclude_modules"
GROUP_SIZE_KEY = "group_size"
HAS_ZERO_POINT_KEY = "has_zero_point"
PRE_QUANT_SCALE_KEY = "pre_quant_scale"

ALGO_FP8 = "FP8"
"""Per-tensor FP8 weights, static per-tensor FP8 activations (ModelOpt's `fp8`)."""
ALGO_FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
"""Per-output-channel FP8 weights, activations scaled per token at run time (ModelOpt's `fp8_pc_pt`)."""
ALGO_W4A16_AWQ = "W4A16_AWQ"
"""Signed int4 weights with one scale per (output row, group of inputs), 16-bit activations."""
WRITTEN_ALGOS = (ALGO_FP8, ALGO_FP8_PER_CHANNEL_PER_TOKEN, ALGO_W4A16_AWQ)
KNOWN_ALGOS = (*WRITTEN_ALGOS, "W4A8_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL", "NVFP4", "NVFP4_AWQ",
               "MIXED_PRECISION", "FP8_PB_WO", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8", "MXFP4")
"""Algorithm names ModelOpt writes (§4.1): a name outside this list is a malformed file, one inside it
but not in `WRITTEN_ALGOS` a real checkpoint bitsmith does not read (`UnsupportedError`)."""

LM_HEAD = "lm_head"
"""ModelOpt never quantizes the LM head by default and lists it in exclude_modules."""

# Tensor suffixes of one quantized linear `<prefix>` (§4.1, MO-uhf `_export_quantized_weight`).
WEIGHT = "weight"
BIAS = "bias"
WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
PRE_QUANT_SCALE = "pre_quant_scale"
KV_SCALES = ("k_scale", "v_scale")
QUANT_SUFFIXES = (WEIGHT_SCALE, INPUT_SCALE, PRE_QUANT_SCALE)

INT4_BITS = 4
INT4_ZERO = 8
"""bitsmith's symmetric 4-bit codes are 0..15 around a zero of 8: signed q = code - 8 in [-8, 7]."""
INT4_GROUP_SIZES = (64, 128)
"""Group sizes written: ModelOpt's `awq_block_size` choices in NVIDIA's examples (128 default, 64) and the
ones TensorRT-LLM's groupwise int4 kernels are documented with. The reader accepts any size dividing K."""

# safetensors dtype strings.
ST_FP8 = "F8_E4M3"
ST_UINT8 = "U8"
ST_FLOAT32 = "F32"
READ_SCALE_DTYPES = ("F32", "F16", "BF16")
"""ModelOpt computes scales in float32 (`amax.float() / maxbound`); half-precision copies are read too."""

DEFAULT_MAX_SHARD_BYTES = GPTQ_DEFAULT_MAX_SHARD_BYTES
COPIED_FILES = GPTQ_COPIED_FILES
