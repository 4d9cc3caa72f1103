"""HF ↔ TensorRT-LLM tensor names for llama / mistral / qwen2 (FORMATS.md §4.2), both directions from one table.

>>> hf_to_trt_tensor("model.layers.3.post_attention_layernorm.weight")
'transformer.layers.3.post_layernorm.weight'
>>> [(l.name, l.parts) for l in trt_linears(1)][0]
('transformer.layers.0.attention.qkv', ('model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', \
'model.layers.0.self_attn.v_proj'))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitsmith.formats.trtllm.constants import EMBED, FINAL_NORM, LAYER, LINEARS, LM_HEAD_WEIGHT, NORMS, QKV, QKV_PARTS

HF_LAYER = "model.layers.{bid}"
TOP_LEVEL = {"model.embed_tokens.weight": EMBED, "model.norm.weight": FINAL_NORM, "lm_head.weight": LM_HEAD_WEIGHT}
_HF_NORM = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True, slots=True)
class TRTLinear:
    """One TensorRT-LLM linear and the HF linears it is made of (several when fused along the output dim)."""

    name: str
    parts: tuple[str, ...]


def trt_linears(layers: int) -> list[TRTLinear]:
    """Every block linear of a `layers`-block model, in block order."""
    out = []
    for bid in range(layers):
        hf, trt = HF_LAYER.format(bid=bid), LAYER.format(bid=bid)
        out.append(TRTLinear(f"{trt}.{QKV}", tuple(f"{hf}.{p}" for p in QKV_PARTS)))
        out.extend(TRTLinear(f"{trt}.{t}", (f"{hf}.{h}",)) for h, t in LINEARS.items())
    return out


def hf_to_trt_tensor(name: str) -> str | None:
    """The TensorRT-LLM name of a non-linear HF tensor (embedding, norms, LM head), or None if unknown."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = _HF_NORM.fullmatch(name)
    if match and match.group(2) in NORMS:
        return f"{LAYER.format(bid=match.group(1))}.{NORMS[match.group(2)]}"
    return None


def trt_to_hf_norms(layers: int) -> dict[str, str]:
    """TensorRT-LLM name → HF name of every non-linear tensor of a `layers`-block model (LM head included)."""
    out = {trt: hf for hf, trt in TOP_LEVEL.items()}
    for bid in range(layers):
        for hf, trt in NORMS.items():
            out[f"{LAYER.format(bid=bid)}.{trt}"] = f"{HF_LAYER.format(bid=bid)}.{hf}"
    return out
