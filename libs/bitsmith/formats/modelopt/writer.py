"""Write NVIDIA ModelOpt's "unified HF" checkpoint (FORMATS.md §4.1) from a source model and solver results.

The files are what `export_hf_checkpoint` writes: HF-named safetensors (every tensor of the source, each
quantized linear's `.weight` replaced by its quantized tensors), `hf_quant_config.json` (what TensorRT-LLM's
PyTorch flow reads) and `config.json` with the converted `quantization_config` (what transformers and vLLM
dispatch on: `quant_method` "modelopt").

Per quantized linear `<p>`:

* FP8: `<p>.weight` float8_e4m3fn [N, K]; `<p>.weight_scale` float32 — a 0-dim tensor for a per-tensor
  scale, and **[N]** for per-channel. Why [N] and not [N, 1]: ModelOpt's own exporter quantizes a
  per-channel weight as ``weight / weight_scale.unsqueeze(-1)`` (`to_quantized_weight`, FP8_PC_PT), i.e.
  the scale it exports is 1-D, one per output row; TensorRT-LLM's row-wise FP8 layer declares its
  `per_channel_scale` as (out_features,) too. `<p>.input_scale` float32 0-dim, only with static
  activations ("FP8"). Dequant: ``data * scale`` — exactly `FP8Weight.dequantize()`.
* W4A16_AWQ: `<p>.weight` uint8 [N/2, K], two output rows per byte (`packing`), signed q = code - 8;
  `<p>.weight_scale` float32 [N, K/group_size], one per (row, group). ModelOpt derives its scales as
  amax/7, but consumers only compute ``q · scale``, so bitsmith stores its solved scales as they are and
  the dequantized weight is exactly `QuantizedWeight.dequantize()` (float32 scales, no rounding). No
  `pre_quant_scale` tensor: bitsmith folds AWQ's scales into the preceding op, so `pre_quant_scale` is false.

Biases keep their dtype. Everything is checked before the first byte is written (`layers`), and the
writer fills an existing empty directory; it never publishes (see `bitsmith.formats.base.Writer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import bitsmith
from bitsmith.errors import ConfigError, FormatError
from bitsmith.formats.awq.writer import block_linears, fused_groups
from bitsmith.formats.base import check_writer_inputs, copy_present_files
from bitsmith.formats.gptq.writer import linear_names
from bitsmith.formats.grid_checks import unquantized_config
from bitsmith.formats.modelopt.constants import (
    ALGO_FP8,
    ALGO_FP8_PER_CHANNEL_PER_TOKEN,
    ALGO_W4A16_AWQ,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    EXCLUDE_MODULES_KEY,
    GROUP_SIZE_KEY,
    HAS_ZERO_POINT_KEY,
    HF_QUANT_CONFIG_FILE,
    INPUT_SCALE,
    KV_CACHE_QUANT_ALGO_KEY,
    LM_HEAD,
    PRE_QUANT_SCALE_KEY,
    PRODUCER,
    PRODUCER_KEY,
    QUANT_ALGO_KEY,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZATION_KEY,
    WEIGHT,
    WEIGHT_SCALE,
)
from bitsmith.formats.modelopt.layers import NvidiaPlan, check_fused_groups, check_layers, check_names, plan
from bitsmith.formats.modelopt.packing import pack_int4_rows, signed_codes
from bitsmith.formats.packed_checkpoint import write_json, write_packed_weights
from bitsmith.formats.safetensors_io import check_dense, scan_checkpoint
from bitsmith.models import read_config
from bitsmith.quantized import FP8Weight, Quantized, QuantizedWeight
from bitsmith.schemes import GPTQOptions

FORMAT_NAME = "ModelOpt"
MARKERS = (QUANTIZATION_CONFIG_KEY, QUANTIZATION_KEY)
"""Keys of a config.json that is already quantized (HF-style, or mlx-lm's block)."""


def layer_tensors(weight: Quantized) -> dict[str, torch.Tensor]:
    """The tensors (by suffix) that replace one validated linear's `.weight` (see the module docstring)."""
    if isinstance(weight, FP8Weight):
        scale = weight.scale.float() if weight.scheme.per_channel else weight.scale.float().reshape(())
        out = {WEIGHT: weight.data.contiguous(), WEIGHT_SCALE: scale.contiguous()}
        if weight.input_scale is not None:
            out[INPUT_SCALE] = weight.input_scale.float().reshape(()).contiguous()
        return out
    if isinstance(weight, QuantizedWeight):
        return {WEIGHT: pack_int4_rows(signed_codes(weight)), WEIGHT_SCALE: weight.scales.float().contiguous()}
    raise FormatError(f"{FORMAT_NAME} cannot store a {type(weight).__name__}")


def layer_nbytes(weight: Quantized) -> int:
    """Bytes `layer_tensors` will produce (to plan shards before anything is packed)."""
    n, k = weight.shape
    if isinstance(weight, FP8Weight):
        return n * k + 4 * weight.scale.numel() + (4 if weight.input_scale is not None else 0)
    assert isinstance(weight, QuantizedWeight)
    return n // 2 * k + 4 * weight.scales.numel()


def hf_quant_config(nv: NvidiaPlan, exclude_modules: Sequence[str]) -> dict[str, Any]:
    """`hf_quant_config.json` as ModelOpt's `get_quant_config` lays it out (§4.1)."""
    quantization: dict[str, Any] = {
        QUANT_ALGO_KEY: nv.quant_algo,
        KV_CACHE_QUANT_ALGO_KEY: None,
        EXCLUDE_MODULES_KEY: list(exclude_modules),
    }
    if nv.quant_algo == ALGO_W4A16_AWQ:
        quantization.update({GROUP_SIZE_KEY: nv.group_size, HAS_ZERO_POINT_KEY: False, PRE_QUANT_SCALE_KEY: False})
    return {PRODUCER_KEY: {"name": PRODUCER, "version": bitsmith.__version__}, QUANTIZATION_KEY: quantization}


def _config_groups(nv: NvidiaPlan) -> dict[str, Any]:
    """llm-compressor-style groups. ModelOpt's converter (MO-conv) spells out only FP8's; the other two
    follow the same pattern with the facts of their algorithm (a bitsmith extrapolation)."""
    if nv.quant_algo == ALGO_FP8:
        args = {"dynamic": False, "num_bits": 8, "type": "float"}
        return {"group_0": {"input_activations": dict(args), "weights": dict(args), "targets": ["Linear"]}}
    if nv.quant_algo == ALGO_FP8_PER_CHANNEL_PER_TOKEN:
        return {"group_0": {"input_activations": {"dynamic": True, "num_bits": 8, "type": "float"},
                            "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}
    return {"group_0": {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": nv.group_size},
                        "targets": ["Linear"]}}


def quantization_config(hf_quant: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's `quantization_config`: ModelOpt's `convert_hf_quant_config_format` of
    `hf_quant_config.json`, plus `quant_method` (§4.1). A null kv-cache algorithm is omitted, as there."""
    quantization = hf_quant[QUANTIZATION_KEY]
    nv = NvidiaPlan(quant_algo=quantization[QUANT_ALGO_KEY])
    out = {
        "quant_method": QUANT_METHOD,
        QUANT_ALGO_KEY: quantization[QUANT_ALGO_KEY],
        "config_groups": _config_groups(nv),
        "ignore": list(quantization[EXCLUDE_MODULES_KEY]),
        PRODUCER_KEY: dict(hf_quant[PRODUCER_KEY]),
    }
    if nv.quant_algo == ALGO_W4A16_AWQ:
        out["config_groups"]["group_0"]["weights"]["group_size"] = quantization[GROUP_SIZE_KEY]
        out.update({k: quantization[k] for k in (GROUP_SIZE_KEY, HAS_ZERO_POINT_KEY, PRE_QUANT_SCALE_KEY)})
    return out


def write_modelopt(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a ModelOpt unified HF checkpoint into the existing empty directory `out_dir` and return it.

    `quantized` maps decoder-block linear names to `FP8Weight`s (one FP8 scheme) or symmetric 4-bit
    `QuantizedWeight`s (one scheme); block linears absent from it stay float and are listed, with the LM
    head, in `exclude_modules`. `variant` must be None (the one layout). `options` is accepted for the
    writer protocol: act-order is refused from the g_idx itself.
    """
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    nv = plan(quantized, FORMAT_NAME)
    if variant not in (None, ""):
        raise ConfigError(f"{FORMAT_NAME} has no variants, got {variant!r}")
    check_writer_inputs(out_dir, max_shard_bytes=max_shard_bytes)
    raw_config = unquantized_config(source_model_dir, markers=MARKERS)
    config, adapter = read_config(source_model_dir)
    source = scan_checkpoint(source_model_dir)
    blocks = block_linears(config, adapter)
    check_names(quantized, blocks, linear_names(source_model_dir), FORMAT_NAME)
    shapes = {name: info.shape if (info := source.get(f"{name}.{WEIGHT}")) else None for name in quantized}
    check_layers(quantized, shapes, FORMAT_NAME)
    if missing := [name for name in blocks if f"{name}.{WEIGHT}" not in source]:
        raise FormatError(f"source model {source_model_dir} lacks {missing[0]}.{WEIGHT}")
    check_fused_groups(fused_groups(config, adapter), quantized, FORMAT_NAME)
    check_dense(source, dense or {}, quantized=quantized)
    exclude = [name for name in blocks if name not in quantized] + [LM_HEAD]

    write_packed_weights(out_dir, source=source, quantized=quantized, pack=layer_tensors, packed_nbytes=layer_nbytes,
                         dense=dense, max_shard_bytes=max_shard_bytes, bias_dtype=None)  # ModelOpt casts no bias
    hf_quant = hf_quant_config(nv, exclude)
    write_json(out_dir / HF_QUANT_CONFIG_FILE, hf_quant)
    write_json(out_dir / CONFIG_FILE, {**raw_config, QUANTIZATION_CONFIG_KEY: quantization_config(hf_quant)})
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir
