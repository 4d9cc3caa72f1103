"""HF ↔ GGUF tensor names (FORMATS.md §5.5) and llama's q/k row permutation (§5.6).

Why gguf's `TensorNameMap`: it is llama.cpp's own table of every checkpoint name per architecture, so a
name it does not know is one llama.cpp would not load either — refused here, naming it. The permutation
moves whole output rows, so it is applied to quantized rows (`GGMLWeight.data`) exactly, and undone on
reading by the inverse row order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.gguf.constants import ARCHITECTURES, Architecture
from bitsmith.formats.gguf.mixes import ModelFacts
from bitsmith.formats.safetensors_io import TensorInfo, scan_checkpoint

SUFFIXES = (".weight", ".bias")
SKIPPED_BUFFERS = (".rotary_emb.inv_freq",)
"""Buffers some old checkpoints saved: llama.cpp computes RoPE itself (the converter drops them too)."""
PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}
"""Block-local linears whose rows llama's RoPE layout permutes, and the config key counting their heads."""


def architecture(model_type: str) -> Architecture:
    """How `model_type` is written; `UnsupportedError` naming it and the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedError(
            f"GGUF: architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def head_dim(config: Mapping[str, Any]) -> int:
    """Per-head width: the config's `head_dim`, else hidden_size / num_attention_heads."""
    value = config.get("head_dim")
    return int(value) if value else int(config["hidden_size"]) // int(config["num_attention_heads"])


def rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of the converter's q/k permutation: new row (h, 2i + j) is old row (h, i + j·d/2).

    Within each head of d = n_rows / n_head rows the two halves are interleaved, so a pair of
    consecutive rows holds what HF's `rotate_half` pairs (i, i + d/2).
    """
    d = n_rows // n_head
    if n_head * d != n_rows or d % 2:
        raise FormatError(f"GGUF: {n_rows} rows do not split into {n_head} heads of an even width")
    return torch.arange(n_rows).reshape(n_head, 2, d // 2).transpose(1, 2).reshape(n_rows)


def block_linears(model_type: str, n_layer: int) -> tuple[str, ...]:
    """Every decoder-block linear module name, block by block."""
    from bitsmith.models import get_adapter

    adapter = get_adapter(model_type)
    return tuple(adapter.block_name(bid, local) for bid in range(n_layer) for local in adapter.linears)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorPlan:
    """The tensors of one model as a GGUF file holds them: HF name → GGUF name, with the facts mixes need.

    Built by `build` from a config and tensor shapes: a source checkpoint's (`from_checkpoint`, for
    writing) or a file's (for reading back). `hf_shapes` lists what the file holds (``lm_head.weight`` only
    for untied embeddings); `gguf_names` maps each to its GGUF name.
    """

    config: Mapping[str, Any]
    arch: Architecture
    hf_shapes: Mapping[str, tuple[int, ...]]
    gguf_names: Mapping[str, str]
    block_linears: tuple[str, ...]

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> TensorPlan:
        """The plan of a source checkpoint (config validated by `bitsmith.models.read_config`)."""
        plan, _ = cls.with_sources(model_dir)
        return plan

    @classmethod
    def with_sources(cls, model_dir: Path) -> tuple[TensorPlan, dict[str, TensorInfo]]:
        """The plan and the checkpoint's tensor headers (what the writer reads from)."""
        from bitsmith.formats.base import read_json_object
        from bitsmith.models import read_config

        raw = read_json_object(model_dir / "config.json", missing=f"source model {model_dir} has no config.json")
        _, adapter = read_config(model_dir)
        sources = {name: info for name, info in scan_checkpoint(model_dir).items()
                   if not name.endswith(SKIPPED_BUFFERS)}
        tied = bool(raw.get("tie_word_embeddings", False))
        if tied:
            sources.pop(adapter.lm_head, None)
        elif adapter.lm_head not in sources:
            raise FormatError(f"{model_dir}: embeddings are not tied but {adapter.lm_head} is missing")
        return cls.build(raw, {name: info.shape for name, info in sources.items()}), sources

    @classmethod
    def build(cls, config: Mapping[str, Any], hf_shapes: Mapping[str, tuple[int, ...]]) -> TensorPlan:
        """The plan of the tensors `hf_shapes` of a model of `config`; `UnsupportedError` for a tensor
        llama.cpp's name table does not know."""
        model_type, n_layer = str(config["model_type"]), int(config["num_hidden_layers"])
        arch = architecture(model_type)
        name_map = gguf.get_tensor_name_map(arch.arch, n_layer)
        names: dict[str, str] = {}
        for hf_name in hf_shapes:
            mapped = name_map.get_name(hf_name, try_suffixes=SUFFIXES)
            if mapped is None:
                raise UnsupportedError(f"GGUF: tensor {hf_name!r} has no {arch.name} GGUF name")
            names[hf_name] = mapped
        return cls(config=config, arch=arch, hf_shapes=hf_shapes, gguf_names=names,
                   block_linears=block_linears(model_type, n_layer))

    @property
    def n_layer(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def facts(self) -> ModelFacts:
        n_head = int(self.config["num_attention_heads"])
        return ModelFacts(arch=self.arch.name, n_layer=self.n_layer, n_head=n_head,
                          n_head_kv=int(self.config.get("num_key_value_heads") or n_head))

    def gguf_name(self, hf_name: str) -> str:
        try:
            return self.gguf_names[hf_name]
        except KeyError:
            raise ConfigError(f"GGUF: {hf_name!r} is not a tensor of the model") from None

    def gguf_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF name → numpy shape (what `mixes.tensor_types` takes)."""
        return {self.gguf_names[name]: shape for name, shape in self.hf_shapes.items()}

    def row_order(self, hf_name: str) -> torch.Tensor | None:
        """Rows of `hf_name` (a weight or bias) in GGUF order, or None where rows are kept as they are."""
        if not self.arch.permute_qk:
            return None
        for local, heads_key in PERMUTED.items():
            if hf_name.endswith((f".{local}.weight", f".{local}.bias")):
                heads = self.config.get(heads_key) or self.config["num_attention_heads"]
                return rope_rows(self.hf_shapes[hf_name][0], int(heads))
        return None
