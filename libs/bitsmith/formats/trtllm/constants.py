"""Every name and number of the TensorRT-LLM checkpoint (FORMATS.md §4.2) bitsmith writes, in one place.

Which source pins each choice (a key of FORMATS.md §10, or TensorRT-LLM's own layer definitions in
`tensorrt_llm/quantization/layers.py`, "TRT-layers") and what is a guess is said next to each constant
and summarised in the package docstring.
"""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES

CONFIG_FILE = "config.json"
RANK_FILE = "rank0.safetensors"
"""One file per tensor-parallel rank [TRT-ckpt]; bitsmith writes world_size 1, so only rank 0."""
RANK_GLOB = "rank*.safetensors"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""`architecture` per HF model_type: the HF class name, as ModelOpt's exporter copies it [MO-trt]; TensorRT-LLM
maps Mistral onto its llama model and Qwen2 onto its QWen model (guess: not re-read from its MODEL_MAP)."""
MODEL_TYPES = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
QWEN_TYPE = {"qwen2": "qwen2"}
"""TensorRT-LLM's QWen config tells qwen/qwen2 apart by `qwen_type` (guess from memory of its QWenConfig)."""

POSITION_EMBEDDING = "rope_gpt_neox"
"""HF llama/qwen2 rotate halves of each head (GPT-NeoX style), TensorRT-LLM's name for that [MO-trt]."""
LOGITS_DTYPE = "float32"
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_GROUP_SIZE = 64
"""TensorRT-LLM's QuantConfig default group_size [TRT-ckpt]; written (unused) for FP8 checkpoints."""
MAPPING = {"world_size": 1, "tp_size": 1, "pp_size": 1}

LM_HEAD = "lm_head"
EMBED = "transformer.vocab_embedding.weight"
FINAL_NORM = "transformer.ln_f.weight"
LM_HEAD_WEIGHT = "lm_head.weight"
LAYER = "transformer.layers.{bid}"
QKV = "attention.qkv"
"""q, k, v concatenated along the output dim [TRT-ckpt names]."""
LINEARS = {
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",
    "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}
"""HF block linear → TensorRT-LLM linear (gate_proj→fc, up_proj→gate, down_proj→proj) [MO-lu]."""
QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
NORMS = {"input_layernorm.weight": "input_layernorm.weight", "post_attention_layernorm.weight": "post_layernorm.weight"}

WEIGHT = "weight"
BIAS = "bias"
WEIGHTS_SCALING_FACTOR = "weights_scaling_factor"
"""FP8: float32 [1] — TRT-layers `FP8Linear` declares Parameter(shape=(1,)) (the file's shape itself is a
§9 open point). int4: float32 [N, K/group_size] — a guess: the per-(row, group) amax/7 layout ModelOpt
computes (MO-qu `get_scaling_factor_from_weight`), which TensorRT-LLM transposes to its (K/group, N)
parameter when it preprocesses the packed weight."""
ACTIVATION_SCALING_FACTOR = "activation_scaling_factor"
"""FP8 static activations: float32 [1] (TRT-layers `FP8Linear`)."""
PER_CHANNEL_SCALE = "per_channel_scale"
"""FP8_PER_CHANNEL_PER_TOKEN: float32 [N] (TRT-layers `Fp8RowwiseLinear`, Parameter(shape=(out_features,));
MO-mcu names it)."""
PREQUANT_SCALING_FACTOR = "prequant_scaling_factor"
QUANT_SUFFIXES = (WEIGHTS_SCALING_FACTOR, ACTIVATION_SCALING_FACTOR, PER_CHANNEL_SCALE, PREQUANT_SCALING_FACTOR)

KNOWN_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W4A16_AWQ", "W8A16", "W4A16", "W4A8_AWQ", "W4A16_GPTQ",
               "W8A8_SQ_PER_CHANNEL", "NVFP4", "MIXED_PRECISION", "FP8_BLOCK_SCALES")

ST_FP8 = "F8_E4M3"
ST_INT8 = "I8"
ST_FLOAT32 = "F32"
FLOAT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

COPIED_FILES = GPTQ_COPIED_FILES
"""Tokenizer and generation files: trtllm-build ignores them; evaluating the artifact needs the tokenizer."""
