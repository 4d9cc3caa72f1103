"""Every name and number of bitsmith's ONNX artifact (FORMATS.md §7), in one place.

The graph builder, writer, reader and runtime import these; none of them restates a number.
"""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES

QUANT_METHOD = "onnx"
"""`config.json:quantization_config.quant_method` of an ONNX artifact (how `bitsmith.runtimes` tells it)."""

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
"""Every initializer larger than `EXTERNAL_THRESHOLD` bytes lives in this one file beside the graph, so
models past protobuf's 2 GiB limit work the same way as the demo; the reader refuses any other location."""
EXTERNAL_THRESHOLD = 1024

OPSET = 17
"""Standard-domain opset (ReduceMean still takes `axes` as an attribute)."""
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
PRODUCER = "bitsmith"

MATMUL_NBITS = "MatMulNBits"
BITS = (2, 4, 8)
"""Widths ONNX Runtime's CPU MatMulNBits kernel runs (1.32: "Only 2b, 4b and 8b quantization is supported";
3-bit fails at session creation). bitsmith's 3-bit layers are refused per layer."""
BLOCK_SIZES = (32, 64, 128)
"""Block (= group) sizes we write; the kernel needs a power of two ≥ 16."""
ACCURACY_LEVEL = 0
"""0 = unset: the CPU kernel computes with float activations (4 would quantize A to int8 per block)."""

# Tensor suffixes of one quantized linear `<prefix>` (the node itself is named `<prefix>`).
QWEIGHT = "qweight"
SCALES = "scales"
ZERO_POINTS = "zero_points"
BIAS = "bias"
WEIGHT = "weight"

# Graph inputs and outputs (the KV cache follows Hugging Face Optimum's naming).
INPUT_IDS = "input_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"
BATCH_DIM = "batch"
SEQ_DIM = "sequence"
PAST_DIM = "past_sequence"
TOTAL_DIM = "total_sequence"

CONFIG_FILE = "config.json"
QUANTIZATION_CONFIG_KEY = "quantization_config"
MODULES_KEY = "modules"
"""`quantization_config.modules`: MatMulNBits node name → its own {bits, group_size, sym} where it
differs from the global scheme (mixed precision; layout in `writer.py`'s docstring)."""
NOT_QUANTIZED_KEY = "not_quantized"
"""`quantization_config.not_quantized`: block linears kept as float MatMul nodes."""
SCHEME_KEYS = ("bits", "group_size", "sym")
"""The keys of the global scheme and of every `modules` entry."""
COPIED_FILES = GPTQ_COPIED_FILES
"""Files copied verbatim from the source checkpoint when present (the tokenizer travels with the graph)."""

SUPPORTED_MODEL_TYPES = ("llama",)
"""Architectures the graph builder emits (Llama: RMSNorm, RoPE, GQA, SwiGLU)."""
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE variants whose frequencies do not depend on the sequence length, so a fixed table is exact."""

MAX_GRAPH_NODES = 1_000_000
"""A graph with more nodes than this is corrupt or hostile (the demo has a few hundred)."""
