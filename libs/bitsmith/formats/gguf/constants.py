"""Every name and number of bitsmith's GGUF files (FORMATS.md §5) that the `gguf` package does not hold.

Key strings, value-type ids, tensor-type ids and block sizes come from `gguf` itself (`gguf.Keys`,
`gguf.GGUFValueType`, `gguf.GGMLQuantizationType`, `gguf.GGML_QUANT_SIZES`); this module only adds what
bitsmith decides: which HF architectures map to which llama.cpp architecture, the file name, and the
bounds the validator enforces before it trusts a count.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import gguf

MAGIC = b"GGUF"
VERSION = 3
"""The only GGUF version bitsmith writes and reads (llama.cpp has written v3 since 2023)."""
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
QUANTIZATION_VERSION = gguf.GGML_QUANT_VERSION
MAX_DIMS = 4
"""GGML_MAX_DIMS: a tensor record with more dimensions is refused by ggml."""
MAX_NAME_BYTES = 63
"""GGML_MAX_NAME is 64 including the terminating NUL."""

FILE_TEMPLATE = "model-{mix}.gguf"
"""The one file of an artifact, named for its tensor-type mix (``model-Q4_K_M.gguf``)."""
SUFFIX = ".gguf"


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """How one HF `model_type` is written: llama.cpp's architecture, and whether q/k rows are permuted.

    `permute_qk`: llama.cpp runs `llama` with RoPE on consecutive pairs (2i, 2i+1) while HF rotates
    halves (i, i + d/2); the converter permutes q/k rows so attention scores are unchanged (§5.6).
    `qwen2` uses NEOX RoPE (halves, as HF), so its rows stay as they are.
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    causal_lm_class: str

    @property
    def name(self) -> str:
        """The `general.architecture` string (``llama``), also the prefix of its hyper-parameter keys."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES = MappingProxyType({
    "llama": Architecture(arch=gguf.MODEL_ARCH.LLAMA, permute_qk=True, causal_lm_class="LlamaForCausalLM"),
    "mistral": Architecture(arch=gguf.MODEL_ARCH.LLAMA, permute_qk=True, causal_lm_class="LlamaForCausalLM"),
    "qwen2": Architecture(arch=gguf.MODEL_ARCH.QWEN2, permute_qk=False, causal_lm_class="Qwen2ForCausalLM"),
})
"""HF `model_type` → how it is written. Mistral is the llama architecture in llama.cpp (its converter maps
`MistralForCausalLM` to `llama`), so a Mistral file reads back as a llama config."""

READ_BACK = MappingProxyType({
    gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]: "llama",
    gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]: "qwen2",
})
"""`general.architecture` → the HF `model_type` a read-back config gets."""

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPM_MODEL = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
