"""The Llama forward pass as an ONNX graph whose quantized linears are `com.microsoft::MatMulNBits`.

Why we build the graph ourselves instead of exporting with torch.onnx and swapping MatMuls: the
exporter's output depends on the torch/transformers versions (op names, fused attention, dynamo vs
TorchScript), and we need every node name tied to the Hugging Face module it came from, so the reader
can give back our codes per layer. The graph is small and follows transformers' Llama exactly
(float32 RMSNorm, rotate-half RoPE from the model's own inverse frequencies, grouped-query attention,
SwiGLU, tied or separate LM head). It carries a KV cache Optimum-style: ``past_key_values.<i>.key`` /
``.value`` inputs [batch, kv_heads, past, head_dim] (zero-length on the first call) and ``present.<i>.*``
outputs; positions and the causal mask are computed in the graph from the past length.

Grouped-query attention without repeating K/V: the query heads of one KV head are contiguous
(transformers' `repeat_kv` order), so queries are reshaped to [batch, kv_heads, n_rep·seq, head_dim]
and attend to the un-repeated keys; the causal mask is tiled n_rep times along its rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitsmith.errors import UnsupportedError
from bitsmith.formats.onnx.constants import (
    ACCURACY_LEVEL,
    BATCH_DIM,
    BIAS,
    INPUT_IDS,
    LOGITS,
    MATMUL_NBITS,
    MS_DOMAIN,
    MS_OPSET,
    OPSET,
    PAST_DIM,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    PRODUCER,
    QWEIGHT,
    SCALES,
    SEQ_DIM,
    STATIC_ROPE_TYPES,
    SUPPORTED_MODEL_TYPES,
    TOTAL_DIM,
    WEIGHT,
    ZERO_POINTS,
)
from bitsmith.formats.onnx.packing import pack_codes, pack_zero_points
from bitsmith.models.base import ArchAdapter
from bitsmith.quantized import QuantizedWeight


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaDims:
    """The numbers of a Llama config the graph needs, checked once."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    tied: bool

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


def llama_dims(config: Any) -> LlamaDims:
    """`LlamaDims` of a transformers config; `UnsupportedError` for what the graph cannot express."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedError(
            f"the ONNX graph builder supports {list(SUPPORTED_MODEL_TYPES)}, not {config.model_type!r}"
        )
    if config.hidden_act != "silu":
        raise UnsupportedError(f"the ONNX Llama graph implements silu, not hidden_act={config.hidden_act!r}")
    heads = int(config.num_attention_heads)
    return LlamaDims(
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=heads,
        kv_heads=int(config.num_key_value_heads or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        eps=float(config.rms_norm_eps),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def rope_tables(config: Any) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2], attention scaling) from transformers' own rotary module."""
    import transformers

    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    if rotary.rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedError(
            f"RoPE type {rotary.rope_type!r} depends on the sequence length; the ONNX graph supports "
            f"{list(STATIC_ROPE_TYPES)}"
        )
    return rotary.inv_freq.float().numpy(), float(rotary.attention_scaling)


class _Builder:
    """Nodes and initializers of one graph, with unique intermediate names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, domain: str = "",
           outputs: Sequence[str] | None = None, **attrs: Any) -> str:
        self._count += 1
        node_name = name or f"{op_type}_{self._count}"
        outs = list(outputs) if outputs is not None else [f"{node_name}/out"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0]


def _quantized_linear(b: _Builder, x: str, name: str, qw: QuantizedWeight, bias: np.ndarray | None) -> str:
    bits, (n, k) = qw.scheme.bits, qw.shape
    block = qw.scheme.group_size
    inputs = [
        x,
        b.const(f"{name}.{QWEIGHT}", pack_codes(qw.codes.numpy(), bits, block)),
        b.const(f"{name}.{SCALES}", qw.scales.float().numpy()),
        "" if qw.scheme.sym else b.const(f"{name}.{ZERO_POINTS}", pack_zero_points(qw.zeros.numpy(), bits)),
    ]
    if bias is not None:
        inputs += ["", b.const(f"{name}.{BIAS}", bias)]
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
    if ACCURACY_LEVEL:
        attrs["accuracy_level"] = ACCURACY_LEVEL
    return b.op(MATMUL_NBITS, inputs, name=name, domain=MS_DOMAIN, **attrs)


def _float_linear(b: _Builder, x: str, weight: str, bias: np.ndarray | None, name: str) -> str:
    """x · Wᵀ with W kept in Hugging Face orientation [N, K] (ONNX Runtime folds the transpose)."""
    y = b.op("MatMul", [x, b.op("Transpose", [weight], perm=[1, 0])], name=name)
    return b.op("Add", [y, b.const(f"{name}.{BIAS}", bias)]) if bias is not None else y


class LlamaGraph:
    """Builds the graph of one model; `linear` picks MatMulNBits or a float MatMul per module."""

    def __init__(self, config: Any, adapter: ArchAdapter, tensors: Mapping[str, np.ndarray],
                 quantized: Mapping[str, QuantizedWeight]) -> None:
        self.config = config
        self.adapter = adapter
        self.dims = llama_dims(config)
        self.tensors = tensors
        self.quantized = quantized
        self.b = _Builder()
        self._named: set[str] = set()

    def named(self, name: str, value: np.ndarray) -> str:
        """An initializer used from several places, added once."""
        if name not in self._named:
            self._named.add(name)
            self.b.const(name, value)
        return name

    def weight(self, name: str) -> str:
        """A float tensor of the checkpoint under its Hugging Face name."""
        return self.named(name, self.tensors[name])

    def scalar(self, name: str, value: float) -> str:
        return self.named(name, np.array(value, dtype=np.float32))

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.named(name, np.array(values, dtype=np.int64))

    def index(self, name: str, value: int) -> str:
        """A 0-d int64 (Range and scalar Gather take scalars)."""
        return self.named(name, np.array(value, dtype=np.int64))

    def linear(self, x: str, module: str) -> str:
        bias = self.tensors.get(f"{module}.{BIAS}")
        if module in self.quantized:
            return _quantized_linear(self.b, x, module, self.quantized[module], bias)
        return _float_linear(self.b, x, self.weight(f"{module}.{WEIGHT}"), bias, module)

    def rms_norm(self, x: str, weight: str) -> str:
        b = self.b
        mean_sq = b.op("ReduceMean", [b.op("Mul", [x, x])], axes=[-1], keepdims=1)
        rms = b.op("Sqrt", [b.op("Add", [mean_sq, self.scalar("eps", self.dims.eps)])])
        return b.op("Mul", [b.op("Div", [x, rms]), self.weight(weight)])

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """x·cos + rotate_half(x)·sin over the last dim (transformers' `apply_rotary_pos_emb`)."""
        b, half = self.b, self.dims.head_dim // 2
        start, middle = self.ints("slice.start", [0]), self.ints("slice.half", [half])
        end, axis = self.ints("slice.end", [2 * half]), self.ints("slice.axis", [-1])
        first, second = b.op("Slice", [x, start, middle, axis]), b.op("Slice", [x, middle, end, axis])
        rotated = b.op("Concat", [b.op("Neg", [second]), first], axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])

    def positions(self, past_key: str) -> tuple[str, str, str]:
        """(cos, sin) [seq, head_dim] for positions past..past+seq-1, and the causal mask [n_rep·seq, total]."""
        b, d = self.b, self.dims
        inv_freq, scaling = rope_tables(self.config)
        past = b.op("Gather", [b.op("Shape", [past_key]), self.index("index2", 2)], axis=0)
        seq = b.op("Gather", [b.op("Shape", [INPUT_IDS]), self.index("index1", 1)], axis=0)
        total = b.op("Add", [past, seq])
        one = self.index("index1", 1)
        query_pos = b.op("Range", [past, total, one])
        key_pos = b.op("Range", [self.index("index0", 0), total, one])
        axis0, axis1 = self.ints("axes0", [0]), self.ints("axes1", [1])
        freqs = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [query_pos], to=TensorProto.FLOAT), axis1]),
                             b.const("rope.inv_freq", inv_freq[None, :].astype(np.float32))])
        angles = b.op("Concat", [freqs, freqs], axis=-1)
        cos, sin = b.op("Cos", [angles]), b.op("Sin", [angles])
        if scaling != 1.0:
            cos = b.op("Mul", [cos, self.scalar("rope.scaling", scaling)])
            sin = b.op("Mul", [sin, self.scalar("rope.scaling", scaling)])
        allowed = b.op("LessOrEqual", [b.op("Unsqueeze", [key_pos, axis0]), b.op("Unsqueeze", [query_pos, axis1])])
        mask = b.op("Where", [allowed, self.scalar("mask.keep", 0.0),
                              self.scalar("mask.drop", float(np.finfo(np.float32).min))])
        if d.n_rep > 1:
            mask = b.op("Tile", [mask, self.ints("mask.repeats", [d.n_rep, 1])])
        return cos, sin, mask

    def attention(self, x: str, layer: int, cos: str, sin: str, mask: str) -> str:
        b, d = self.b, self.dims
        prefix = self.adapter.block_name(layer, "self_attn")

        def heads(y: str, count: int) -> str:
            shaped = b.op("Reshape", [y, self.ints(f"shape.heads{count}", [0, 0, count, d.head_dim])])
            return b.op("Transpose", [shaped], perm=[0, 2, 1, 3])

        q = self.rotate(heads(self.linear(x, f"{prefix}.q_proj"), d.heads), cos, sin)
        k = self.rotate(heads(self.linear(x, f"{prefix}.k_proj"), d.kv_heads), cos, sin)
        v = heads(self.linear(x, f"{prefix}.v_proj"), d.kv_heads)
        keys = b.op("Concat", [PAST_KEY.format(layer=layer), k], axis=2, outputs=[PRESENT_KEY.format(layer=layer)])
        values = b.op("Concat", [PAST_VALUE.format(layer=layer), v], axis=2,
                      outputs=[PRESENT_VALUE.format(layer=layer)])
        grouped = b.op("Reshape", [q, self.ints("shape.grouped", [0, d.kv_heads, -1, d.head_dim])])
        scores = b.op("MatMul", [grouped, b.op("Transpose", [keys], perm=[0, 1, 3, 2])])
        scores = b.op("Add", [b.op("Mul", [scores, self.scalar("attn.scale", d.head_dim**-0.5)]), mask])
        context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), values])
        context = b.op("Reshape", [context, self.ints("shape.ungrouped", [0, d.heads, -1, d.head_dim])])
        merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                  self.ints("shape.merged", [0, 0, d.heads * d.head_dim])])
        return self.linear(merged, f"{prefix}.o_proj")

    def mlp(self, x: str, layer: int) -> str:
        b = self.b
        prefix = self.adapter.block_name(layer, "mlp")
        gate = self.linear(x, f"{prefix}.gate_proj")
        up = self.linear(x, f"{prefix}.up_proj")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        return self.linear(act, f"{prefix}.down_proj")

    def build(self) -> onnx.ModelProto:
        b, d = self.b, self.dims
        cos, sin, mask = self.positions(PAST_KEY.format(layer=0))
        hidden = b.op("Gather", [self.weight(self.adapter.embed), INPUT_IDS], axis=0)
        for layer in range(d.layers):
            block = self.adapter.block_prefix.format(bid=layer)
            normed = self.rms_norm(hidden, f"{block}.input_layernorm.{WEIGHT}")
            hidden = b.op("Add", [hidden, self.attention(normed, layer, cos, sin, mask)])
            normed = self.rms_norm(hidden, f"{block}.post_attention_layernorm.{WEIGHT}")
            hidden = b.op("Add", [hidden, self.mlp(normed, layer)])
        hidden = self.rms_norm(hidden, self.adapter.final_norm)
        head = self.adapter.lm_head.removesuffix(f".{WEIGHT}")
        if d.tied and head not in self.quantized:
            b.op("MatMul", [hidden, b.op("Transpose", [self.weight(self.adapter.embed)], perm=[1, 0])],
                 name=head, outputs=[LOGITS])
        else:
            b.op("Identity", [self.linear(hidden, head)], outputs=[LOGITS])
        return self._model()

    def _model(self) -> onnx.ModelProto:
        d = self.dims
        cache: list[str | int | None] = [BATCH_DIM, d.kv_heads, PAST_DIM, d.head_dim]
        present: list[str | int | None] = [BATCH_DIM, d.kv_heads, TOTAL_DIM, d.head_dim]
        inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH_DIM, SEQ_DIM])]
        outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT,
                                                 [BATCH_DIM, SEQ_DIM, int(self.config.vocab_size)])]
        for layer in range(d.layers):
            for past, pres in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
                inputs.append(helper.make_tensor_value_info(past.format(layer=layer), TensorProto.FLOAT, cache))
                outputs.append(helper.make_tensor_value_info(pres.format(layer=layer), TensorProto.FLOAT, present))
        graph = helper.make_graph(self.b.nodes, "bitsmith", inputs, outputs, self.b.initializers)
        return helper.make_model(
            graph,
            producer_name=PRODUCER,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
        )
