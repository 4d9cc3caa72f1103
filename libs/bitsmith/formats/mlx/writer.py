"""Write bitsmith's codes in mlx-lm's quantized safetensors layout (FORMATS.md §6).

Why this keeps calibrated quality: MLX's affine grid is w = scale·q + bias per group, and a zero-point
grid w = scale·(q - zero) is the same thing with bias = -scale·zero, so GPTQ's codes go in unchanged
instead of being re-rounded. Each quantized linear becomes `<p>.weight` uint32 [N, K·bits/32] (every row
one little-endian bit stream, the same stream GPTQ packs along K), `<p>.scales` and `<p>.biases`
[N, K/group]; everything else is copied in the model dtype. config.json gains mlx-lm's `quantization`
block and its copy `quantization_config`. The variant is the model dtype: "float16" (default),
"bfloat16" or "float32".

Mixed precision: the block's global bits/group_size are the most common scheme's
(`bitsmith.formats.gptq.dynamic.default_scheme`), and every linear stored with another bits/group_size
gets its own entry keyed by its module path, ``"model.layers.0.self_attn.q_proj": {"group_size": 64,
"bits": 8, "mode": "affine"}`` — the entries mlx-lm's `quantize_model` writes and its `load_model`
looks up first (`class_predicate`: ``if p in config["quantization"]``). A linear left out of `quantized`
is stored as its float `.weight` with no `.scales` and no entry: mlx-lm quantizes a module only if it
has an entry or `<p>.scales` exists, so it stays an `nn.Linear`. MLX grids have no `sym`: a symmetric
layer is the affine grid whose zero is 2^(bits-1), so entries differ by bits and group size only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import ConfigError, FormatError
from bitsmith.formats.base import (
    check_writer_inputs,
    copy_present_files,
    integer_weights,
    save_safetensors_atomic,
    write_file_atomic,
)
from bitsmith.formats.gptq.dynamic import default_scheme
from bitsmith.formats.gptq.packing import pack_dim0
from bitsmith.formats.grid_checks import check_layer, check_schemes, unquantized_config
from bitsmith.formats.mlx.constants import (
    BIASES,
    BITS,
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_DTYPE,
    DTYPES,
    GROUP_SIZES,
    METADATA,
    MODE,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZATION_KEY,
    SCALES,
    WEIGHT,
    WEIGHTS_FILE,
)
from bitsmith.formats.safetensors_io import check_dense, load_tensors, scan_checkpoint
from bitsmith.models import read_config
from bitsmith.quantized import Quantized, QuantizedWeight
from bitsmith.schemes import GPTQOptions, QuantScheme

FORMAT_NAME = "MLX"


def module_entry(scheme: QuantScheme) -> dict[str, Any]:
    """mlx-lm's quantization parameters of one scheme (the global ones, or one module's entry)."""
    return {"group_size": scheme.group_size, "bits": scheme.bits, "mode": MODE}


def quantization_block(scheme: QuantScheme, modules: Mapping[str, QuantScheme] | None = None) -> dict[str, Any]:
    """mlx-lm's `quantization` block: the global `scheme`, and an entry for each of `modules` that differs."""
    block = module_entry(scheme)
    for name, own in sorted((modules or {}).items()):
        if (own.bits, own.group_size) != (scheme.bits, scheme.group_size):
            block[name] = module_entry(own)
    return block


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] → uint32 [N, K·bits/32]: each row a little-endian bit stream (FORMATS.md §6)."""
    return pack_dim0(codes.t().contiguous(), bits).t().contiguous().view(torch.uint32)


def affine_tensors(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`weight`, `scales`, `biases` of one linear; biases from the scales as stored (rounded to `dtype`)."""
    scales = qw.scales.to(dtype)
    biases = -(scales.double() * qw.zeros.double()).to(dtype)
    return {WEIGHT: pack_rows(qw.codes, qw.scheme.bits), SCALES: scales.contiguous(), BIASES: biases.contiguous()}


def write_mlx(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model.safetensors`, config.json and the tokenizer into the empty `out_dir`.

    `quantized` maps linear module names to solved weights (each layer its own scheme: 2/3/4/8 bits,
    groups of 32/64/128, contiguous); linears absent from it stay float (see the module docstring);
    `dense` replaces source tensors (see `bitsmith.formats.base.Writer`);
    `variant` is the model dtype (see the module docstring). `options` is
    accepted for the writer protocol (act-order is refused through the g_idx check).
    """
    quantized = integer_weights(quantized, "MLX")
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    dtype_name = variant or DEFAULT_DTYPE
    if dtype_name not in DTYPES:
        raise ConfigError(f"MLX variant (model dtype) must be one of {sorted(DTYPES)}, got {variant!r}")
    dtype: torch.dtype = getattr(torch, dtype_name)
    check_writer_inputs(out_dir)
    raw_config = unquantized_config(source_model_dir, markers=(QUANTIZATION_KEY, QUANTIZATION_CONFIG_KEY))
    read_config(source_model_dir)  # an architecture bitsmith (and so mlx-lm's llama family) knows
    check_schemes(quantized, fmt=FORMAT_NAME, bits=BITS, group_sizes=GROUP_SIZES)
    scheme = default_scheme(quantized)
    source = scan_checkpoint(source_model_dir)
    for name, qw in sorted(quantized.items()):
        info = source.get(f"{name}.{WEIGHT}")
        check_layer(name, qw, info.shape if info is not None else None, fmt=FORMAT_NAME)
        if not torch.isfinite(qw.scales.to(dtype)).all():
            raise FormatError(f"{FORMAT_NAME}: quantized layer {name!r}: scales overflow {dtype_name}")

    check_dense(source, dense or {}, quantized=quantized)
    replaced = {f"{name}.{WEIGHT}" for name in quantized}
    float_infos = (info for tensor, info in source.items() if tensor not in replaced)
    tensors = {name: t.to(dtype) for name, t in load_tensors(float_infos, dense).items()}
    for name, qw in quantized.items():
        tensors.update({f"{name}.{suffix}": t for suffix, t in affine_tensors(qw, dtype).items()})
    save_safetensors_atomic(out_dir / WEIGHTS_FILE, tensors, METADATA)

    block = quantization_block(scheme, {name: qw.scheme for name, qw in quantized.items()})
    config = {**raw_config, QUANTIZATION_KEY: block, QUANTIZATION_CONFIG_KEY: block}
    write_file_atomic(out_dir / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir
