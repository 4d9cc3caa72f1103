"""Write one GGUF file (FORMATS.md §5) from a source checkpoint and the pipeline's ggml-grid solves.

Why it refuses so much up front: llama.cpp trusts every type and shape it reads, and a mix is a promise
to the user ("this is Q4_K_M"), so before the first byte is written every block linear must be a
`GGMLWeight` of exactly the type the mix assigns it (`bitsmith.formats.gguf.mixes`), of its source's
shape, and every linear the mix quantizes must be there — the pipeline solves them all, and llama-quantize
mixes never keep a linear float. An integer-grid `QuantizedWeight` (GPTQ-style codes) cannot be stored:
GGUF blocks carry their own scale encoding, so the solve must target the ggml grid (`GGMLScheme`).

The solved blocks are written as they are, after llama's q/k row permutation (whole rows move, so it is
exact). Every other tensor (embedding, output, norms, biases) is encoded here from the source, or its
`dense` replacement: F32 for 1-D tensors, the mix's type for the rest (`bitsmith.algos.kquant` for block
types). Tensors are planned first and encoded one at a time as they are written, so memory holds one
tensor, not the model. The file goes to a temporary name, is fsynced and renamed, inside the staging
directory `bitsmith.manifest.build_artifact` publishes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from bitsmith.errors import ConfigError, FormatError
from bitsmith.formats.base import check_writer_inputs, fsync_path, temp_sibling
from bitsmith.formats.gguf.constants import FILE_TEMPLATE
from bitsmith.formats.gguf.metadata import add_hparams
from bitsmith.formats.gguf.mixes import Mix, get_mix, tensor_types, visit_order
from bitsmith.formats.gguf.names import TensorPlan
from bitsmith.formats.gguf.tokenizer import Vocab, read_vocab
from bitsmith.formats.grid_checks import unquantized_config
from bitsmith.formats.safetensors_io import TensorInfo, check_dense, load_tensors
from bitsmith.quantized import GGMLWeight, QuantizedWeight
from bitsmith.schemes import GGMLType, GPTQOptions

FORMAT_NAME = "GGUF"
MARKERS = ("quantization_config", "quantization")
"""Keys of a config.json that is already quantized: re-quantizing one is refused."""
WEIGHT = ".weight"


def _mix_types(mix: Mix, plan: TensorPlan, quantized: Mapping[str, object]) -> dict[str, GGMLType]:
    """GGUF name → type. Where llama-quantize's choice depends on an importance matrix (Q4_0/Q5_0 ffn_down),
    the solves say which was used: the imatrix choice is taken if every linear it changes was solved on it."""
    shapes = plan.gguf_shapes()
    plain = tensor_types(mix, plan.facts, shapes)
    informed = tensor_types(mix, plan.facts, shapes, imatrix=True)
    moved = [name for name in plan.block_linears if plain[plan.gguf_name(name + WEIGHT)]
             != informed[plan.gguf_name(name + WEIGHT)]]
    solved = {name: weight.scheme.type for name in moved if isinstance(weight := quantized.get(name), GGMLWeight)}
    if moved and all(solved.get(name) is informed[plan.gguf_name(name + WEIGHT)] for name in moved):
        return informed
    return plain


def _check_linears(
    mix: Mix, plan: TensorPlan, types: Mapping[str, GGMLType], quantized: Mapping[str, object]
) -> dict[str, GGMLWeight]:
    """The solves, each checked against the mix (see the module docstring)."""
    weights: dict[str, GGMLWeight] = {}
    for name, weight in sorted(quantized.items()):
        where = f"{FORMAT_NAME}: quantized layer {name!r}"
        if isinstance(weight, QuantizedWeight):
            raise FormatError(f"{where} is an integer grid ({weight.scheme}); GGUF stores ggml blocks, so the "
                              "layer must be solved onto its ggml type (a GGMLScheme target, see gguf.mixes)")
        if not isinstance(weight, GGMLWeight):
            raise FormatError(f"{where} is a {type(weight).__name__}, not a GGMLWeight")
        if name not in plan.block_linears:
            raise ConfigError(f"{where} is not a decoder-block linear of the source model (token_embd and output "
                              "are encoded by the writer)")
        source_shape = plan.hf_shapes[name + WEIGHT]
        if weight.shape != source_shape:
            raise ConfigError(f"{where}: source weight is {list(source_shape)}, the blocks hold {list(weight.shape)}")
        expected = types[plan.gguf_name(name + WEIGHT)]
        if not mix.quantized:
            raise FormatError(f"{where}: mix {mix.name} keeps every weight in {mix.default.value}, but the layer "
                              f"was solved to {weight.scheme.type.value}")
        if weight.scheme.type is not expected:
            raise FormatError(f"{where} was solved to {weight.scheme.type.value}, but mix {mix.name} gives it "
                              f"{expected.value}")
        weights[name] = weight
    missing = [name for name in plan.block_linears
               if types[plan.gguf_name(name + WEIGHT)].is_quantized and name not in weights]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{FORMAT_NAME}: mix {mix.name} quantizes {missing[0]!r}{more}, but no solve was given "
                          "for it; llama-quantize mixes keep no linear in float")
    return weights


def _float_bytes(tensor: torch.Tensor, ggml_type: GGMLType, name: str) -> torch.Tensor:
    """A float tensor's rows as uint8, in a float ggml type."""
    dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[ggml_type]
    cast = tensor.to(dtype).contiguous()
    if not torch.isfinite(cast).all():
        raise FormatError(f"{FORMAT_NAME}: tensor {name!r} is not finite in {ggml_type.value}")
    return cast.view(torch.uint8)


def _quantize(tensor: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    from bitsmith.algos import kquant

    return kquant.quantize(tensor, ggml_type).data


def _encode(
    hf_name: str, ggml_type: GGMLType, plan: TensorPlan, weights: Mapping[str, GGMLWeight],
    info: TensorInfo, dense: Mapping[str, torch.Tensor] | None,
) -> np.ndarray:
    """The bytes of one tensor as the file stores it: [rows, row bytes] (1-D tensors: [bytes])."""
    order = plan.row_order(hf_name)
    solved = weights.get(hf_name.removesuffix(WEIGHT))
    if solved is not None:
        data = solved.data
    else:
        tensor = load_tensors([info], dense)[hf_name].float()
        if order is not None:
            tensor = tensor[order]
            order = None
        data = _quantize(tensor, ggml_type) if ggml_type.is_quantized else _float_bytes(tensor, ggml_type, hf_name)
    if order is not None:
        data = data[order]
    return data.contiguous().numpy()


def _gguf_type(ggml_type: GGMLType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(ggml_type.ggml_id)


def _byte_shape(shape: tuple[int, ...], ggml_type: GGMLType) -> tuple[int, ...]:
    return (*shape[:-1], ggml_type.row_bytes(shape[-1]))


def _write_file(
    path: Path, plan: TensorPlan, mix: Mix, types: Mapping[str, GGMLType], vocab: Vocab, name: str,
    encode: Mapping[str, tuple[str, TensorInfo]], weights: Mapping[str, GGMLWeight],
    dense: Mapping[str, torch.Tensor] | None,
) -> None:
    """Header, metadata and tensor records, then each tensor encoded and written in record order."""
    writer = gguf.GGUFWriter(path=None, arch=plan.arch.name)
    add_hparams(writer, plan, mix, name)
    vocab.add_to(writer)
    for gguf_name, (hf_name, _) in encode.items():
        ggml_type = types[gguf_name]
        byte_shape = _byte_shape(plan.hf_shapes[hf_name], ggml_type)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=_gguf_type(ggml_type))
    tmp = temp_sibling(path)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, (hf_name, info) in encode.items():
            writer.write_tensor_data(_encode(hf_name, types[gguf_name], plan, weights, info, dense))
        writer.close()
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_gguf(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, GGMLWeight | QuantizedWeight],
    options: GPTQOptions | None = None,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model-<mix>.gguf`` into the existing empty directory `out_dir` and return the directory.

    `variant` is the mix (llama-quantize's file type name, `gguf.mixes.mix_names()`; None: F16).
    `quantized` maps decoder-block linear names to their solves on the mix's types (see the module
    docstring); `dense` replaces source tensors (see `bitsmith.formats.base.Writer`). `options` is accepted
    for the writer protocol and unused: the blocks carry everything.
    """
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    mix = get_mix(variant)
    check_writer_inputs(out_dir)
    unquantized_config(source_model_dir, markers=MARKERS)
    plan, sources = TensorPlan.with_sources(source_model_dir)
    types = _mix_types(mix, plan, quantized)
    weights = _check_linears(mix, plan, types, quantized)
    check_dense(sources, dense or {}, quantized=weights)
    vocab = read_vocab(source_model_dir, plan.config)
    ordered = sorted(sources, key=lambda hf: visit_order(plan.gguf_name(hf)))
    encode = {plan.gguf_name(hf): (hf, sources[hf]) for hf in ordered}
    _write_file(out_dir / FILE_TEMPLATE.format(mix=mix.name), plan, mix, types, vocab, source_model_dir.name,
                encode, weights, dense)
    return out_dir

