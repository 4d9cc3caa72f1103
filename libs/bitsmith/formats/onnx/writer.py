"""Write a model as an ONNX graph with `com.microsoft::MatMulNBits` linears (FORMATS.md §7).

The writer validates everything before it writes a byte: every layer's own scheme has 2, 4 or 8 bits
(what ONNX Runtime's CPU kernel runs; 3-bit is refused at session creation) and a block size 32/64/128
equal to its group size, contiguous groups (no act-order g_idx), codes and zeros in range, every
quantized name a linear the graph uses with the source's shape. It then builds the graph (`graph.py`:
each MatMulNBits node carries its own layer's `bits` and `block_size`; linears left out of `quantized`
stay float MatMuls), saves it with its large initializers in one external data file, and has
`onnx.checker` check the saved model. Beside the graph go the source's config.json, with a
`quantization_config` that names the format, and the tokenizer files.

`quantization_config` (the reader checks every node against it)::

    {"quant_method": "onnx", "bits": 4, "group_size": 128, "sym": false,     # the global scheme
     "modules": {"model.layers.0.self_attn.q_proj":                         # nodes with their own
                 {"bits": 8, "group_size": 64, "sym": false}},
     "not_quantized": ["model.layers.1.mlp.down_proj"]}                      # block linears in float

The global scheme is the most common one (`bitsmith.formats.gptq.dynamic.default_scheme`); `modules`
maps each MatMulNBits node whose bits/group_size/sym differ to its full scheme; `not_quantized` lists the
block linears kept as float MatMul (the lm_head is float unless quantized, as in every format, and is
not listed). Both keys appear only when non-empty, so a one-scheme artifact's config is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from bitsmith.errors import ConfigError, FormatError
from bitsmith.formats.base import check_writer_inputs, copy_present_files, integer_weights, write_file_atomic
from bitsmith.formats.gptq.dynamic import default_scheme
from bitsmith.formats.grid_checks import check_layer, check_schemes, unquantized_config
from bitsmith.formats.onnx.constants import (
    BITS,
    BLOCK_SIZES,
    CONFIG_FILE,
    COPIED_FILES,
    DATA_FILE,
    EXTERNAL_THRESHOLD,
    MODEL_FILE,
    MODULES_KEY,
    NOT_QUANTIZED_KEY,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    WEIGHT,
)
from bitsmith.formats.onnx.graph import LlamaGraph
from bitsmith.formats.safetensors_io import check_dense, load_tensors, scan_checkpoint
from bitsmith.models import read_config
from bitsmith.quantized import Quantized
from bitsmith.schemes import GPTQOptions, QuantScheme

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "ONNX MatMulNBits"


def _scheme_fields(scheme: QuantScheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym}


def quantization_config(scheme: QuantScheme, modules: Mapping[str, QuantScheme] | None = None,
                        not_quantized: Collection[str] = ()) -> dict[str, Any]:
    """What config.json records about the graph's MatMulNBits nodes (layout in the module docstring):
    the global `scheme`, each of `modules` whose scheme differs from it, and the float block linears."""
    config = {"quant_method": QUANT_METHOD, **_scheme_fields(scheme)}
    overrides = {name: _scheme_fields(own) for name, own in sorted((modules or {}).items())
                 if _scheme_fields(own) != _scheme_fields(scheme)}
    if overrides:
        config[MODULES_KEY] = overrides
    if not_quantized:
        config[NOT_QUANTIZED_KEY] = sorted(not_quantized)
    return config


def write_onnx(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model.onnx` (+ `model.onnx.data`), config.json and the tokenizer into the empty `out_dir`.

    `quantized` maps module names (``model.layers.0.self_attn.q_proj``) to solved weights, each with its
    own scheme; they become MatMulNBits nodes of the same name, every other linear a float MatMul
    (`dense` replaces source tensors, see `bitsmith.formats.base.Writer`). `options` is accepted for the
    writer protocol (act-order is refused through the g_idx check); there are no variants.
    """
    quantized = integer_weights(quantized, "ONNX")
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    if variant is not None:
        raise ConfigError(f"the {FORMAT_NAME} format has no variants, got {variant!r}")
    check_writer_inputs(out_dir)
    raw_config = unquantized_config(source_model_dir, markers=(QUANTIZATION_CONFIG_KEY,))
    config, adapter = read_config(source_model_dir)
    check_schemes(quantized, fmt=FORMAT_NAME, bits=BITS, group_sizes=BLOCK_SIZES)
    scheme = default_scheme(quantized)
    source = scan_checkpoint(source_model_dir)
    block_linears = {adapter.block_name(bid, local) for bid in range(config.num_hidden_layers)
                     for local in adapter.linears}
    graph_linears = block_linears | {adapter.lm_head.removesuffix(f".{WEIGHT}")}
    for name, qw in sorted(quantized.items()):
        if name not in graph_linears:
            raise ConfigError(f"{FORMAT_NAME}: quantized layer {name!r} is not a linear of the graph")
        info = source.get(f"{name}.{WEIGHT}")
        check_layer(name, qw, info.shape if info is not None else None, fmt=FORMAT_NAME)
    check_dense(source, dense or {}, quantized=quantized)

    replaced = {f"{name}.{WEIGHT}" for name in quantized}
    float_infos = [info for tensor, info in source.items() if tensor not in replaced]
    tensors = {name: t.float().numpy() for name, t in load_tensors(float_infos, dense).items()}
    model = LlamaGraph(config, adapter, tensors, quantized).build()
    _save(model, out_dir)

    qcfg = quantization_config(scheme, {name: qw.scheme for name, qw in quantized.items()},
                               block_linears - set(quantized))
    config_text = json.dumps({**raw_config, QUANTIZATION_CONFIG_KEY: qcfg}, indent=2, sort_keys=True)
    write_file_atomic(out_dir / CONFIG_FILE, (config_text + "\n").encode())
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir


def _save(model: onnx.ModelProto, out_dir: Path) -> None:
    """Graph + one external data file, then `onnx.checker` on the saved model (it follows the data file)."""
    path = out_dir / MODEL_FILE
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=EXTERNAL_THRESHOLD)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise FormatError(f"{path}: the graph bitsmith built does not pass onnx.checker: {e}") from e

