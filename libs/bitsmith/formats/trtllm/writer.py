"""Write a TensorRT-LLM checkpoint (FORMATS.md §4.2) from a source model and solver results.

Why renaming and fusing here: `trtllm-build` reads TensorRT-LLM's own module names, with q/k/v as one
linear. Each source tensor is mapped to its TensorRT-LLM name (`names`); anything the map does not know is
refused rather than silently dropped. What may be quantized and how is shared with the ModelOpt writer
(`bitsmith.formats.modelopt.layers`), and every check runs before the first byte is written. The writer
fills an existing empty directory; it never publishes (see `bitsmith.formats.base.Writer`). Which choices
are pinned by a source and which are guesses: see the package docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import bitsmith
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.awq.writer import block_linears, fused_groups
from bitsmith.formats.base import check_writer_inputs, copy_present_files, save_safetensors_atomic
from bitsmith.formats.gptq.writer import linear_names
from bitsmith.formats.grid_checks import unquantized_config
from bitsmith.formats.modelopt.constants import ALGO_W4A16_AWQ
from bitsmith.formats.modelopt.layers import NvidiaPlan, check_fused_groups, check_layers, check_names, plan
from bitsmith.formats.modelopt.packing import pack_int4_rows, signed_codes
from bitsmith.formats.modelopt.writer import MARKERS
from bitsmith.formats.packed_checkpoint import write_json
from bitsmith.formats.safetensors_io import PT_METADATA, check_dense, load_tensors, scan_checkpoint
from bitsmith.formats.trtllm.constants import (
    ACTIVATION_SCALING_FACTOR,
    ARCHITECTURES,
    BIAS,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_GROUP_SIZE,
    DTYPES,
    LM_HEAD,
    LOGITS_DTYPE,
    MAPPING,
    PER_CHANNEL_SCALE,
    POSITION_EMBEDDING,
    QWEN_TYPE,
    RANK_FILE,
    WEIGHT,
    WEIGHTS_SCALING_FACTOR,
)
from bitsmith.formats.trtllm.names import TRTLinear, hf_to_trt_tensor, trt_linears
from bitsmith.models import read_config
from bitsmith.quantized import FP8Weight, Quantized, QuantizedWeight
from bitsmith.schemes import FP8_E4M3_MAX, GPTQOptions

FORMAT_NAME = "TensorRT-LLM"


def fuse_fp8(parts: Sequence[FP8Weight]) -> FP8Weight:
    """One FP8 weight for linears fused along the output dim.

    Per channel the rows and their scales are concatenated: lossless. Per tensor the fused weight has one
    scale, so — as ModelOpt does before export — every shard is requantized to the largest scale s_max:
    ``fp8(clamp(data · s / s_max, ±448))``. A shard that already has s_max keeps its bytes; the others are
    rounded once more onto e4m3 (relative error up to 2^-4 of each value, plus subnormal underflow below
    2^-9 · s_max), the loss ModelOpt's own FP8 checkpoints carry. The static input scale is the largest of
    the shards' (they read the same input; vLLM takes the max as well).
    """
    if len(parts) == 1:
        return parts[0]
    scheme = parts[0].scheme
    if scheme.per_channel:
        return FP8Weight(data=torch.cat([p.data for p in parts]), scale=torch.cat([p.scale for p in parts]),
                         scheme=scheme, input_scale=None)
    s_max = torch.stack([p.scale.float().reshape(()) for p in parts]).max()
    datas = []
    for p in parts:
        if torch.equal(p.scale.float().reshape(()), s_max):
            datas.append(p.data)
        else:
            values = p.data.float() * p.scale.float().reshape(()) / s_max
            datas.append(values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn))
    input_scale = None
    if scheme.static_activations:
        input_scale = torch.stack([p.input_scale.reshape(()) for p in parts if p.input_scale is not None]).max()
    return FP8Weight(data=torch.cat(datas), scale=s_max.reshape(1).float(), scheme=scheme,
                     input_scale=None if input_scale is None else input_scale.reshape(1).float())


def linear_tensors(parts: Sequence[Quantized]) -> dict[str, torch.Tensor]:
    """The tensors (by suffix) of one TensorRT-LLM linear made of validated quantized HF linears."""
    if all(isinstance(p, FP8Weight) for p in parts):
        fused = fuse_fp8([p for p in parts if isinstance(p, FP8Weight)])
        if fused.scheme.per_channel:
            return {WEIGHT: fused.data.contiguous(), PER_CHANNEL_SCALE: fused.scale.float().contiguous()}
        assert fused.input_scale is not None
        return {WEIGHT: fused.data.contiguous(), WEIGHTS_SCALING_FACTOR: fused.scale.float().reshape(1),
                ACTIVATION_SCALING_FACTOR: fused.input_scale.float().reshape(1)}
    ints = [p for p in parts if isinstance(p, QuantizedWeight)]
    if len(ints) != len(parts):
        raise FormatError(f"{FORMAT_NAME}: a fused linear mixes grids")
    # every shard has an even row count, so packing each and concatenating equals packing the concatenation
    packed = torch.cat([pack_int4_rows(signed_codes(p)) for p in ints])
    return {WEIGHT: packed.view(torch.int8), WEIGHTS_SCALING_FACTOR: torch.cat([p.scales.float() for p in ints])}


def _dtype(raw: Mapping[str, Any]) -> str:
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise UnsupportedError(f"{FORMAT_NAME}: model dtype {dtype!r} is not one of {list(DTYPES)}")
    return str(dtype)


def _rotary(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rotary_base, rotary_scaling): HF's rope_theta and, for a non-default RoPE type, its parameters with
    `type` set (the spelling TensorRT-LLM's llama config takes; a guess beyond the default type)."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else None
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else params
    theta = raw.get("rope_theta", (params or {}).get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    return float(theta), {k: v for k, v in {**(scaling or {}), "type": rope_type}.items() if k != "rope_theta"}


def trt_config(raw: Mapping[str, Any], config: Any, nv: NvidiaPlan, exclude: Sequence[str]) -> dict[str, Any]:
    """config.json (§4.2 fields, plus the ModelOpt exporter's extras and bitsmith's `tie_word_embeddings`)."""
    model_type = str(raw["model_type"])
    heads = int(config.num_attention_heads)
    head_size = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    rotary_base, rotary_scaling = _rotary(raw)
    out: dict[str, Any] = {
        "architecture": ARCHITECTURES[model_type],
        "dtype": _dtype(raw),
        "logits_dtype": LOGITS_DTYPE,
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": int(config.max_position_embeddings),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_size": int(head_size),
        "hidden_act": str(config.hidden_act),
        "intermediate_size": int(config.intermediate_size),
        "norm_epsilon": float(config.rms_norm_eps),
        "position_embedding_type": POSITION_EMBEDDING,
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "mapping": dict(MAPPING),
        "quantization": {
            "quant_algo": nv.quant_algo,
            "kv_cache_quant_algo": None,
            "group_size": nv.group_size if nv.quant_algo == ALGO_W4A16_AWQ else DEFAULT_GROUP_SIZE,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": list(exclude),
        },
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "attn_bias": bool(getattr(config, "attention_bias", False)) or model_type == "qwen2",
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "producer": {"name": "bitsmith", "version": bitsmith.__version__},
    }
    if model_type in QWEN_TYPE:
        out["qwen_type"] = QWEN_TYPE[model_type]
    return out


def write_trtllm(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a TensorRT-LLM checkpoint (world size 1) into the existing empty directory `out_dir`.

    `quantized` maps decoder-block linear names (HF) to `FP8Weight`s or symmetric 4-bit `QuantizedWeight`s
    sharing one scheme; q/k/v (and gate/up) are quantized all or none. Unquantized block linears and the LM
    head are listed, by TensorRT-LLM name, in `exclude_modules`. `variant` must be None.
    """
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    nv = plan(quantized, FORMAT_NAME)
    if variant not in (None, ""):
        raise ConfigError(f"{FORMAT_NAME} has no variants, got {variant!r}")
    check_writer_inputs(out_dir)
    raw = unquantized_config(source_model_dir, markers=MARKERS)
    config, adapter = read_config(source_model_dir)
    if adapter.model_type not in ARCHITECTURES:
        raise UnsupportedError(f"{FORMAT_NAME}: architecture {adapter.model_type!r} has no TensorRT-LLM names here; "
                               f"supported: {sorted(ARCHITECTURES)}")
    source = scan_checkpoint(source_model_dir)
    blocks = block_linears(config, adapter)
    check_names(quantized, blocks, linear_names(source_model_dir), FORMAT_NAME)
    shapes = {name: info.shape if (info := source.get(f"{name}.{WEIGHT}")) else None for name in quantized}
    check_layers(quantized, shapes, FORMAT_NAME)
    check_fused_groups(fused_groups(config, adapter), quantized, FORMAT_NAME)
    check_dense(source, dense or {}, quantized=quantized)
    linears = trt_linears(int(config.num_hidden_layers))
    hf_linears = {part for linear in linears for part in linear.parts}
    for linear in linears:
        for part in linear.parts:
            if f"{part}.{WEIGHT}" not in source:
                raise FormatError(f"source model {source_model_dir} lacks {part}.{WEIGHT}")
    renamed: dict[str, str] = {}
    for name in sorted(source):
        prefix, _, suffix = name.rpartition(".")
        if prefix in hf_linears and suffix in (WEIGHT, BIAS):
            continue
        target = hf_to_trt_tensor(name)
        if target is None:
            raise UnsupportedError(f"{FORMAT_NAME}: source tensor {name!r} has no TensorRT-LLM name")
        renamed[name] = target
    tied = bool(getattr(config, "tie_word_embeddings", False))
    exclude = [linear.name for linear in linears if linear.parts[0] not in quantized] + [LM_HEAD]

    loaded = load_tensors(source.values(), dense)
    tensors: dict[str, torch.Tensor] = {target: loaded[name] for name, target in renamed.items()}
    if "lm_head.weight" not in tensors:
        if not tied:
            raise FormatError(f"source model {source_model_dir} has no lm_head.weight and does not tie embeddings")
        tensors["lm_head.weight"] = loaded[adapter.embed].clone()  # TensorRT-LLM's llama reads its own LM head
    for linear in linears:
        tensors.update(_linear(linear, quantized, loaded))
    save_safetensors_atomic(out_dir / RANK_FILE, dict(sorted(tensors.items())), PT_METADATA)
    write_json(out_dir / CONFIG_FILE, trt_config(raw, config, nv, exclude))
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir


def _linear(linear: TRTLinear, quantized: Mapping[str, Quantized], loaded: Mapping[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    biases = [loaded.get(f"{part}.{BIAS}") for part in linear.parts]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise UnsupportedError(f"{FORMAT_NAME}: {linear.name} fuses {list(linear.parts)}, only some with a bias")
        out[f"{linear.name}.{BIAS}"] = torch.cat([b for b in biases if b is not None])
    if linear.parts[0] in quantized:
        parts = [quantized[part] for part in linear.parts]
        out.update({f"{linear.name}.{suffix}": t for suffix, t in linear_tensors(parts).items()})
    else:
        out[f"{linear.name}.{WEIGHT}"] = torch.cat([loaded[f"{part}.{WEIGHT}"] for part in linear.parts])
    return out
