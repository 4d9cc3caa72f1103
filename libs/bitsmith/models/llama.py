"""Llama and Mistral: the same block layout, so two rows of data.

Biases are off unless the config's ``attention_bias`` / ``mlp_bias`` flags turn them on.
"""

from __future__ import annotations

from dataclasses import replace

from bitsmith.models.base import ArchAdapter, register_adapter

_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

LLAMA = register_adapter(
    ArchAdapter(
        model_type="llama",
        architectures=("LlamaForCausalLM",),
        causal_lm_class="LlamaForCausalLM",
        bias_flags={**dict.fromkeys(_ATTENTION, "attention_bias"), **dict.fromkeys(_MLP, "mlp_bias")},
    )
)

MISTRAL = register_adapter(
    replace(
        LLAMA,
        model_type="mistral",
        architectures=("MistralForCausalLM",),
        causal_lm_class="MistralForCausalLM",
        bias_flags={},
    )
)
