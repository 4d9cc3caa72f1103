"""Hyper-parameter metadata (FORMATS.md §5.3): HF config → GGUF keys on writing, and back on reading.

Why both directions live together: the reader must rebuild exactly the config the writer described, so
each key is named once here. Types are what llama.cpp's converter writes (uint32 for counts, float32 for
eps and the RoPE base); llama.cpp reads context, embedding and block counts without defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.gguf.constants import ARCHITECTURES, QUANTIZATION_VERSION, READ_BACK
from bitsmith.formats.gguf.mixes import Mix
from bitsmith.formats.gguf.names import TensorPlan, head_dim
from bitsmith.models.base import DIMENSION_LIMITS

K = gguf.Keys
DEFAULT_ROPE_THETA = 10000.0
MAX_CONTEXT = 1 << 26
"""A context length past this is corrupt, not a model."""


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from transformers 5's `rope_parameters` or 4's `rope_scaling` + `rope_theta`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _add_rope_scaling(writer: gguf.GGUFWriter, params: Mapping[str, Any]) -> None:
    """Linear and YaRN scaling are metadata in llama.cpp; other kinds are refused rather than dropped."""
    kind = params["rope_type"]
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    else:
        raise UnsupportedError(f"GGUF: RoPE scaling {kind!r} is not supported (linear and yarn are)")


def add_hparams(writer: gguf.GGUFWriter, plan: TensorPlan, mix: Mix, name: str) -> None:
    """`general.*` and `<arch>.*` keys of the model described by `plan`, written as `mix`."""
    config = plan.config
    writer.add_name(name)
    writer.add_file_type(int(mix.file_type))
    writer.add_quantization_version(QUANTIZATION_VERSION)
    n_head = int(config["num_attention_heads"])
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(plan.n_layer)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    _add_rope_scaling(writer, rope)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim(config))
    if config.get("head_dim"):
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config["vocab_size"]))


def _decimal(value: float) -> float:
    """A float32 from the file as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"GGUF: expected a number, the file has {value!r}")
    return float(str(np.float32(value)))


def _dimension(name: str, value: Any, limit: int | None = None) -> int:
    """A model dimension from the file, refused outside [1, limit] before anything is sized by it."""
    limit = DIMENSION_LIMITS[name] if limit is None else limit
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise FormatError(f"GGUF: {name} must be an integer in [1, {limit}], the file has {value!r}")
    return value


def _value(fields: Mapping[str, gguf.ReaderField], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    if field is None:
        if default is None:
            raise FormatError(f"GGUF: required key {key!r} is missing")
        return default
    return field.contents()


def rebuild_config(fields: Mapping[str, gguf.ReaderField], *, tied: bool, biased: bool) -> dict[str, Any]:
    """An HF-style config.json dict from a file's metadata (`tied`: no output.weight; `biased`: q/k/v biases)."""
    arch_name = _value(fields, K.General.ARCHITECTURE)
    model_type = READ_BACK.get(arch_name)
    if model_type is None:
        raise UnsupportedError(f"GGUF: architecture {arch_name!r} is not supported; supported: {sorted(READ_BACK)}")

    def key(template: str, default: Any = None) -> Any:
        return _value(fields, template.format(arch=arch_name), default)

    n_head = _dimension("num_attention_heads", key(K.Attention.HEAD_COUNT))
    hidden = _dimension("hidden_size", key(K.LLM.EMBEDDING_LENGTH))
    tokens = fields.get(K.Tokenizer.LIST)
    vocab = key(K.LLM.VOCAB_SIZE, len(tokens.data) if tokens is not None else None)
    rope = {"rope_theta": _decimal(key(K.Rope.FREQ_BASE, DEFAULT_ROPE_THETA)), "rope_type": "default"}
    scaling = key(K.Rope.SCALING_TYPE, "none")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=_decimal(key(K.Rope.SCALING_FACTOR)))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = _dimension(
                "original_max_position_embeddings", key(K.Rope.SCALING_ORIG_CTX_LEN), MAX_CONTEXT)
    elif scaling != "none":
        raise UnsupportedError(f"GGUF: RoPE scaling {scaling!r} is not supported")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type].causal_lm_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": key(K.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": key(K.LLM.BLOCK_COUNT),
        "num_attention_heads": n_head,
        "num_key_value_heads": key(K.Attention.HEAD_COUNT_KV, n_head),
        "head_dim": key(K.Attention.KEY_LENGTH, key(K.Rope.DIMENSION_COUNT, hidden // n_head)),
        "max_position_embeddings": _dimension("max_position_embeddings", key(K.LLM.CONTEXT_LENGTH), MAX_CONTEXT),
        "rms_norm_eps": _decimal(key(K.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    for name, limit in DIMENSION_LIMITS.items():
        _dimension(name, config[name], limit)
    if n_head % config["num_key_value_heads"]:
        raise FormatError(f"GGUF: {n_head} attention heads do not share {config['num_key_value_heads']} KV heads")
    if model_type == "llama":
        config.update(attention_bias=biased, mlp_bias=False)
    for hf_key, gguf_key in (("bos_token_id", K.Tokenizer.BOS_ID), ("eos_token_id", K.Tokenizer.EOS_ID),
                             ("pad_token_id", K.Tokenizer.PAD_ID)):
        if gguf_key in fields:
            config[hf_key] = int(fields[gguf_key].contents())
    return config
