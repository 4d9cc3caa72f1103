"""llama-quantize's named file types ("mixes"): which ggml type every tensor of a model gets.

Why exact: users compare our ``Q4_K_M`` with llama.cpp's, size for size and tensor for tensor, and the
pipeline solves each linear straight onto the type its mix assigns, so the choice must be llama-quantize's
own. The rules below restate `llama_tensor_get_type` of llama.cpp's src/llama-quant.cpp for dense
llama-family models (llama, mistral, qwen2; no experts, not Falcon):

* Only tensors with ≥ 2 dimensions whose name ends in ``weight`` and does not contain ``_norm.weight`` are
  quantized; the rest keep the converter's type (F32 for norms and biases).
* ``output.weight``, and ``token_embd.weight`` when there is no output (tied embeddings), get Q6_K —
  unless the mix's own type is Q8_0 (kept), or ne[0] is not a multiple of that type's block (Q8_0).
* ``attn_v`` (i = its running index, n = their count), ``ffn_down`` (i = layer), ``attn_output``: per-mix
  bumps (Q2_K: v → Q4_K if n_head/n_head_kv ≥ 4 else Q3_K, down and output → Q3_K; Q3_K_M: v → Q5_K for
  i < 2 else Q4_K, down → Q5_K for i < n/16 else Q4_K, output → Q4_K; Q3_K_L: v, down, output → Q5_K;
  Q4_K_M / Q5_K_M: v and down → Q6_K where use_more_bits(i, n); Q4_K_S: v → Q5_K for i < 4, down → Q5_K
  for i < n/8; Q4_0 / Q5_0 with an importance matrix: down → Q4_1 / Q5_1 for i < n/8); a "70B" model
  (80 layers, GQA for llama) moves a v of Q3_K/Q4_K to Q5_K.
* Last, a type whose block does not divide ne[0] falls back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
  Q2_K/Q3_K → Q4_0, and to F16 when even that does not divide.

Tensors are visited in llama.cpp's order (block index, then name), which the running index of attn_v
depends on.

>>> get_mix("Q4_K").name, int(get_mix("Q4_K_M").file_type)
('Q4_K_M', 15)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gguf import LlamaFileType

from bitsmith.errors import ConfigError
from bitsmith.schemes import GGMLType

T = GGMLType


@dataclass(frozen=True, slots=True, kw_only=True)
class Mix:
    """One named file type: its `general.file_type` and the type of every tensor no rule moves."""

    name: str
    file_type: LlamaFileType
    default: GGMLType

    @property
    def quantized(self) -> bool:
        """Whether the mix quantizes anything (False for F32, F16 and BF16, which keep every weight float)."""
        return self.default.is_quantized


def _mix(name: str, file_type: LlamaFileType, default: GGMLType) -> tuple[str, Mix]:
    return name, Mix(name=name, file_type=file_type, default=default)


MIXES: Mapping[str, Mix] = MappingProxyType(dict([
    _mix("F32", LlamaFileType.ALL_F32, T.F32),
    _mix("F16", LlamaFileType.MOSTLY_F16, T.F16),
    _mix("BF16", LlamaFileType.MOSTLY_BF16, T.BF16),
    _mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    _mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    _mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
    _mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
    _mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
    _mix("Q2_K", LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
    _mix("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
    _mix("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
    _mix("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K),
    _mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K),
    _mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    _mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
    _mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    _mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
]))
"""The mixes bitsmith writes, by llama-quantize's name."""

ALIASES: Mapping[str, str] = MappingProxyType({"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"})
"""llama-quantize's shorthands."""

DEFAULT_MIX = "F16"
"""What a GGUF job without a variant writes: the converter's default, every weight kept in float16."""


def mix_names() -> tuple[str, ...]:
    """Every accepted mix name (aliases included), in `MIXES` order."""
    return (*MIXES, *ALIASES)


def get_mix(name: str | None) -> Mix:
    """The mix called `name` (None: `DEFAULT_MIX`); `ConfigError` listing the valid names otherwise."""
    key = DEFAULT_MIX if name is None else ALIASES.get(name, name)
    try:
        return MIXES[key]
    except KeyError:
        raise ConfigError(f"unknown GGUF mix {name!r}; valid: {', '.join(mix_names())}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFacts:
    """What llama-quantize's choice depends on besides names and shapes."""

    arch: str
    """`general.architecture` (``llama`` or ``qwen2``)."""
    n_layer: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B: 80 layers (llama: with grouped-query attention, else it is "65B")."""
        return self.n_layer == 80 and (self.arch != "llama" or self.n_head != self.n_head_kv)


_BLOCK = re.compile(r"blk\.(\d+)\.")


def visit_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order: block index (tensors outside blocks first), then name."""
    match = _BLOCK.match(name)
    return (int(match.group(1)) if match else -1, name)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_FALLBACK = MappingProxyType({T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0})


def _fit(ggml_type: GGMLType, ne0: int) -> GGMLType:
    """The shape fallback: a type whose block does not divide ne[0] gives way to a 32-block type, then F16."""
    if ne0 % ggml_type.block_size == 0:
        return ggml_type
    smaller = _FALLBACK.get(ggml_type, ggml_type)
    return smaller if ne0 % smaller.block_size == 0 else T.F16


class _Chooser:
    """One pass over a model's tensors in llama.cpp's order, keeping its running counters."""

    def __init__(self, mix: Mix, facts: ModelFacts, names: Iterable[str], imatrix: bool) -> None:
        self.mix, self.facts, self.imatrix = mix, facts, imatrix
        names = list(names)
        self.tied = "output.weight" not in names
        self.n_attn_v = sum("attn_v.weight" in name for name in names)
        self.i_attn_v = 0
        self.i_ffn_down = 0

    def choose(self, name: str, shape: tuple[int, ...]) -> GGMLType:
        mix = self.mix
        if not _quantizable(name, shape):
            return T.F32
        if not mix.quantized:
            return mix.default
        ne0 = shape[-1]
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            chosen = self._output(ne0)
        elif name == "token_embd.weight":
            chosen = mix.default
        elif "attn_v.weight" in name:
            chosen = self._attn_v(self.i_attn_v)
            self.i_attn_v += 1
        elif "ffn_down" in name:
            chosen = self._ffn_down(self.i_ffn_down)
            self.i_ffn_down += 1
        elif "attn_output.weight" in name:
            chosen = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix.name, mix.default)
        else:
            chosen = mix.default
        return _fit(chosen, ne0)

    def _output(self, ne0: int) -> GGMLType:
        if ne0 % self.mix.default.block_size:
            return T.Q8_0
        return T.Q8_0 if self.mix.default is T.Q8_0 else T.Q6_K

    def _attn_v(self, i: int) -> GGMLType:
        name, facts = self.mix.name, self.facts
        chosen = self.mix.default
        if name == "Q2_K":
            chosen = T.Q4_K if facts.n_gqa >= 4 else T.Q3_K
        elif name == "Q3_K_M":
            chosen = T.Q5_K if i < 2 else T.Q4_K
        elif name == "Q3_K_L":
            chosen = T.Q5_K
        elif name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, self.n_attn_v):
            chosen = T.Q6_K
        elif name == "Q4_K_S" and i < 4:
            chosen = T.Q5_K
        if facts.is_70b and chosen in (T.Q3_K, T.Q4_K):
            chosen = T.Q5_K
        return chosen

    def _ffn_down(self, i: int) -> GGMLType:
        name, n = self.mix.name, self.facts.n_layer
        if name == "Q2_K":
            return T.Q3_K
        if name == "Q3_K_M":
            return T.Q5_K if i < n // 16 else T.Q4_K
        if name == "Q3_K_L":
            return T.Q5_K
        if name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return T.Q6_K
        if name == "Q4_K_S" and i < n // 8:
            return T.Q5_K
        if name in ("Q4_0", "Q5_0") and self.imatrix and i < n // 8:
            return T.Q4_1 if name == "Q4_0" else T.Q5_1
        return self.mix.default


def tensor_types(
    mix: str | Mix, facts: ModelFacts, shapes: Mapping[str, tuple[int, ...]], *, imatrix: bool = False
) -> dict[str, GGMLType]:
    """The ggml type of every tensor (GGUF name → numpy shape) under `mix`, as llama-quantize picks it.

    `imatrix`: whether the weights are solved with an importance matrix (llama-quantize's ``--imatrix``),
    which changes the first n/8 ``ffn_down`` of Q4_0 and Q5_0 files.
    """
    chosen = mix if isinstance(mix, Mix) else get_mix(mix)
    chooser = _Chooser(chosen, facts, shapes, imatrix)
    return {name: chooser.choose(name, tuple(shapes[name])) for name in sorted(shapes, key=visit_order)}


def linear_types(mix: str, source_model_dir: Path, *, imatrix: bool = False) -> dict[str, GGMLType | None]:
    """HF linear module name (``model.layers.2.self_attn.v_proj``) → the ggml type its weight gets under
    `mix`, or None where the mix keeps it float (F32, F16, BF16): the solve target of every block linear.

    `imatrix` as in `tensor_types`. Raises `ConfigError` for an unknown mix and `UnsupportedError` for an
    architecture GGUF files of bitsmith do not cover.
    """
    from bitsmith.formats.gguf.names import TensorPlan

    chosen = get_mix(mix)
    plan = TensorPlan.from_checkpoint(Path(source_model_dir))
    types = tensor_types(chosen, plan.facts, plan.gguf_shapes(), imatrix=imatrix)
    return {
        linear: types[plan.gguf_name(f"{linear}.weight")] if chosen.quantized else None
        for linear in plan.block_linears
    }
