"""Read a GGUF artifact back (FORMATS.md §5): validated bytes → an HF-style config and dense weights.

Why the order: `layout.validate` proves the file sound at the byte level first; only then does gguf's
`GGUFReader` parse the metadata. The config is rebuilt from the metadata (`metadata.rebuild_config`),
every tensor name is mapped back to its HF name through llama.cpp's own name table, and every shape is
checked against the transformers model that config describes, so `dense_state_dict` always loads.
Dequantization is `bitsmith.algos.kquant` (the same decoder `GGMLWeight.dequantize` uses), q/k rows are
un-permuted, and a file without ``output.weight`` reads back with tied embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.gguf.layout import Layout, TensorRecord, gguf_file, validate
from bitsmith.formats.gguf.metadata import rebuild_config
from bitsmith.formats.gguf.names import SUFFIXES, TensorPlan, architecture
from bitsmith.quantized import GGMLWeight
from bitsmith.schemes import GGMLScheme, GGMLType

BLOCK_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_BY_ID = {t.ggml_id: t for t in GGMLType}


@dataclass(frozen=True, slots=True, kw_only=True)
class GGUFCheckpoint:
    """A validated GGUF file: its rebuilt config, raw metadata, byte layout and tensors by HF name."""

    path: Path
    config: Mapping[str, Any]
    metadata: Mapping[str, Any]
    layout: Layout
    plan: TensorPlan
    records: Mapping[str, TensorRecord]
    """HF tensor name → its record in the file."""
    raw: np.ndarray
    """The whole file, memory-mapped (uint8)."""

    def types(self) -> dict[str, GGMLType]:
        """HF tensor name → the ggml type it is stored in."""
        return {name: _BY_ID[int(record.type)] for name, record in self.records.items()}

    def _bytes(self, record: TensorRecord) -> torch.Tensor:
        start = self.layout.data_offset + record.offset
        rows = record.shape[:-1] or (1,)
        stored = self.raw[start:start + record.nbytes].reshape(*rows, -1)
        return torch.from_numpy(np.array(stored))

    def _unpermute(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        order = self.plan.row_order(name)
        return tensor if order is None else tensor[torch.argsort(order)]

    def quantized_weights(self) -> dict[str, GGMLWeight]:
        """HF linear name → its blocks in HF row order, for every block-typed tensor of a linear."""
        out: dict[str, GGMLWeight] = {}
        for name, ggml_type in self.types().items():
            if ggml_type.is_quantized and name.removesuffix(".weight") in self.plan.block_linears:
                data = self._unpermute(name, self._bytes(self.records[name]))
                out[name.removesuffix(".weight")] = GGMLWeight(
                    data=data, scheme=GGMLScheme(type=ggml_type), in_features=self.records[name].ne[0])
        return out

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float weights (dequantized, q/k un-permuted); tied embeddings have no lm_head entry."""
        state: dict[str, torch.Tensor] = {}
        for name, ggml_type in self.types().items():
            record = self.records[name]
            data = self._bytes(record)
            if ggml_type.is_quantized:
                values = GGMLWeight(data=data, scheme=GGMLScheme(type=ggml_type), in_features=record.ne[0]).dequantize()
            else:
                values = _float_values(data, ggml_type)
            state[name] = self._unpermute(name, values.reshape(record.shape)).to(dtype)
        return state


def _float_values(data: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[ggml_type]
    return data.contiguous().view(dtype).float()


def _candidates(config: Mapping[str, Any]) -> list[str]:
    """Every HF tensor name a model of `config` may hold (biases of every linear included)."""
    from bitsmith.models import get_adapter

    adapter = get_adapter(str(config["model_type"]))
    names = [adapter.embed, adapter.final_norm, adapter.lm_head]
    for bid in range(int(config["num_hidden_layers"])):
        names += [adapter.block_name(bid, norm) for norm in BLOCK_NORMS]
        names += [adapter.block_name(bid, linear) + suffix for linear in adapter.linears for suffix in SUFFIXES]
    return names


def _expected_shapes(path: Path, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes transformers' model of `config` has (built on the meta device, nothing allocated), after
    the checks every checkpoint's config gets: a file's metadata is as untrusted as a config.json."""
    from bitsmith.models.base import meta_state_shapes, parse_config

    hf_config, adapter = parse_config(config, path)
    return meta_state_shapes(hf_config, adapter, path)


def _map_tensors(path: Path, layout: Layout, config: Mapping[str, Any]) -> dict[str, TensorRecord]:
    arch = architecture(str(config["model_type"]))
    name_map = gguf.get_tensor_name_map(arch.arch, int(config["num_hidden_layers"]))
    blocks = int(config["num_hidden_layers"])
    if not any(record.name.startswith(f"blk.{blocks - 1}.") for record in layout.tensors):
        raise FormatError(f"{path}: the metadata claims {blocks} blocks, the file has no tensor of block {blocks - 1}")
    back = {name_map.get_name(hf, try_suffixes=SUFFIXES): hf for hf in _candidates(config)}
    expected = _expected_shapes(path, config)  # after the check above: it builds a model of every claimed block
    records: dict[str, TensorRecord] = {}
    for record in layout.tensors:
        hf = back.get(record.name)
        if hf is None:
            raise FormatError(f"{path}: tensor {record.name!r} is not part of a {arch.name} model")
        if record.type.value not in _BY_ID:
            raise UnsupportedError(f"{path}: tensor {record.name!r} is {record.type.name}; bitsmith reads "
                                   f"{[t.value for t in GGMLType]}")
        if expected.get(hf) != record.shape:
            raise FormatError(f"{path}: tensor {record.name!r} has shape {list(record.shape)}, the model in the "
                              f"metadata needs {list(expected.get(hf, ()))}")
        records[hf] = record
    tied = bool(config["tie_word_embeddings"])
    required = [name for name in expected if not (tied and name.startswith("lm_head."))]
    if missing := [name for name in required if name not in records]:
        raise FormatError(f"{path}: tensor for {missing[0]!r} is missing ({len(missing)} missing)")
    return records


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Validate and read the GGUF artifact at `path` (its directory, or the .gguf file itself)."""
    file = gguf_file(path)
    layout = validate(file)
    try:
        reader = gguf.GGUFReader(file, "r")
    except ValueError as e:  # what validate() accepts gguf-py should too; a disagreement is still a bad file
        raise FormatError(f"{file}: gguf cannot parse it: {e}") from e
    names = {record.name for record in layout.tensors}
    biased = any(name.endswith("attn_q.bias") for name in names)
    config = rebuild_config(reader.fields, tied="output.weight" not in names, biased=biased)
    records = _map_tensors(file, layout, config)
    plan = TensorPlan.build(config, {name: record.shape for name, record in records.items()})
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return GGUFCheckpoint(path=file, config=config, metadata=metadata, layout=layout, plan=plan, records=records,
                          raw=reader.data)
