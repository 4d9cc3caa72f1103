"""Qwen2: the llama block layout, with biases on the q/k/v projections."""

from __future__ import annotations

from bitsmith.models.base import ArchAdapter, register_adapter

QWEN2 = register_adapter(
    ArchAdapter(
        model_type="qwen2",
        architectures=("Qwen2ForCausalLM",),
        causal_lm_class="Qwen2ForCausalLM",
        bias_flags=dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
    )
)
