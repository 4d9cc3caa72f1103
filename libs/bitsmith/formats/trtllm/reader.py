"""Read and validate a TensorRT-LLM checkpoint as bitsmith writes it (FORMATS.md §4.2, checklist §8 item 4).

Why: the evaluator rebuilds the float model from the artifact, and files from the store or the wire are
untrusted. config.json is checked field by field (architecture, dtype, dimensions within the bounds
`bitsmith.models.base.DIMENSION_LIMITS` sets for HF configs, mapping of one rank, the quantization block),
rank0.safetensors' header is validated (`safetensors_io`) before anything is loaded, and every tensor must be
one the config implies, with its dtype and shape: a quantized linear's set by its algorithm, a float linear
only if `exclude_modules` names it, nothing unknown. Scales must be finite (FP8's also positive) and FP8 data
free of NaN. The reader inverts the writer: fused q/k/v are split back, names mapped to HF's, and
`dense_state_dict` is HF-named. Malformed input is a `FormatError`; a well-formed checkpoint in a layout
bitsmith does not read (several ranks, a KV-cache algorithm, zero points, pre-quant scales, other algorithms)
is an `UnsupportedError`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import FormatError, NotFoundError, UnsupportedError
from bitsmith.formats.base import dense_state, read_json_object
from bitsmith.formats.modelopt.constants import ALGO_FP8, ALGO_FP8_PER_CHANNEL_PER_TOKEN, ALGO_W4A16_AWQ
from bitsmith.formats.modelopt.layers import fp8_scheme
from bitsmith.formats.modelopt.packing import int4_weight, unpack_int4_rows
from bitsmith.formats.safetensors_io import PT_METADATA, TensorInfo, expect_tensor, load_tensors, read_header
from bitsmith.formats.trtllm.constants import (
    ACTIVATION_SCALING_FACTOR,
    BIAS,
    CONFIG_FILE,
    DTYPES,
    EMBED,
    FINAL_NORM,
    FLOAT_DTYPES,
    KNOWN_ALGOS,
    LM_HEAD_WEIGHT,
    MODEL_TYPES,
    PER_CHANNEL_SCALE,
    POSITION_EMBEDDING,
    RANK_FILE,
    ST_FLOAT32,
    ST_FP8,
    ST_INT8,
    WEIGHT,
    WEIGHTS_SCALING_FACTOR,
)
from bitsmith.formats.trtllm.names import TRTLinear, trt_linears, trt_to_hf_norms
from bitsmith.models.base import DIMENSION_LIMITS
from bitsmith.quantized import FP8Weight, QuantizedWeight

SCALE_DTYPES = ("F32", "F16", "BF16")
_INT_FIELDS = {
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings", "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_size": "head_dim", "intermediate_size": "intermediate_size",
}  # fmt: skip
"""config.json integer field → the HF dimension whose bound it shares."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TRTLLMParams:
    """The parsed config: dimensions and the quantization block."""

    model_type: str
    quant_algo: str
    group_size: int | None
    exclude_modules: tuple[str, ...]
    dims: Mapping[str, int]
    tied: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TRTLLMCheckpoint:
    """A validated TensorRT-LLM checkpoint, in HF terms.

    `config` is TensorRT-LLM's config.json; `quantized` maps HF linear names (q/k/v split back) to
    `FP8Weight`s or symmetric 4-bit `QuantizedWeight`s; `tensors` holds every other tensor under its HF name.
    """

    path: Path
    config: Mapping[str, Any]
    params: TRTLLMParams
    quantized: Mapping[str, FP8Weight | QuantizedWeight]
    tensors: Mapping[str, torch.Tensor]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict: each quantized linear's `.weight` is its dequantized weight."""
        return dense_state(self.tensors, self.quantized, dtype)

    def hf_config(self) -> dict[str, Any]:
        """An HF config.json for the dense model (what transformers needs to build it)."""
        c, d = self.config, self.params.dims
        out: dict[str, Any] = {
            "architectures": [c["architecture"]], "model_type": self.params.model_type,
            "vocab_size": d["vocab_size"], "max_position_embeddings": d["max_position_embeddings"],
            "hidden_size": d["hidden_size"], "intermediate_size": d["intermediate_size"],
            "num_hidden_layers": d["num_hidden_layers"], "num_attention_heads": d["num_attention_heads"],
            "num_key_value_heads": d["num_key_value_heads"], "head_dim": d["head_size"],
            "hidden_act": c["hidden_act"], "rms_norm_eps": c["norm_epsilon"], "rope_theta": c["rotary_base"],
            "tie_word_embeddings": self.params.tied, "torch_dtype": c["dtype"],
        }  # fmt: skip
        if self.params.model_type != "qwen2":
            out["attention_bias"] = bool(c.get("attn_bias", False))
            out["mlp_bias"] = bool(c.get("mlp_bias", False))
        return out


def _positive_number(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise FormatError(f"{CONFIG_FILE}: {key} must be a finite positive number, got {value!r}")
    return float(value)


def parse_config(config: Mapping[str, Any]) -> TRTLLMParams:
    """Validate config.json (see the module docstring)."""
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise FormatError(f"{CONFIG_FILE}: architecture must be a string, got {arch!r}")
    if arch not in MODEL_TYPES:
        raise UnsupportedError(f"{CONFIG_FILE}: architecture {arch!r} is not one bitsmith reads: {sorted(MODEL_TYPES)}")
    if config.get("dtype") not in DTYPES:
        raise FormatError(f"{CONFIG_FILE}: dtype must be one of {list(DTYPES)}, got {config.get('dtype')!r}")
    dims: dict[str, int] = {}
    for key, bound in _INT_FIELDS.items():
        value, limit = config.get(key), DIMENSION_LIMITS[bound]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise FormatError(f"{CONFIG_FILE}: {key} must be an integer in [1, {limit}], got {value!r}")
        dims[key] = value
    if dims["num_attention_heads"] % dims["num_key_value_heads"]:
        raise FormatError(f"{CONFIG_FILE}: num_attention_heads {dims['num_attention_heads']} is not a multiple of "
                          f"num_key_value_heads {dims['num_key_value_heads']}")
    for key in ("norm_epsilon", "rotary_base"):
        _positive_number(config, key)
    if not isinstance(config.get("hidden_act"), str):
        raise FormatError(f"{CONFIG_FILE}: hidden_act must be a string, got {config.get('hidden_act')!r}")
    if config.get("position_embedding_type") != POSITION_EMBEDDING:
        raise UnsupportedError(f"{CONFIG_FILE}: position_embedding_type {config.get('position_embedding_type')!r} "
                               f"is not {POSITION_EMBEDDING!r}")
    mapping = config.get("mapping")
    if not isinstance(mapping, dict):
        raise FormatError(f"{CONFIG_FILE}: mapping must be an object, got {mapping!r}")
    for key in ("world_size", "tp_size", "pp_size"):
        value = mapping.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FormatError(f"{CONFIG_FILE}: mapping.{key} must be a positive integer, got {value!r}")
        if value != 1:
            raise UnsupportedError(f"{CONFIG_FILE}: mapping.{key} is {value}; bitsmith reads single-rank checkpoints")
    tied = config.get("tie_word_embeddings", False)
    if type(tied) is not bool:
        raise FormatError(f"{CONFIG_FILE}: tie_word_embeddings must be true/false, got {tied!r}")
    algo, group_size, exclude = _parse_quantization(config.get("quantization"))
    return TRTLLMParams(model_type=MODEL_TYPES[arch], quant_algo=algo, group_size=group_size,
                        exclude_modules=exclude, dims=dims, tied=tied)


def _parse_quantization(block: Any) -> tuple[str, int | None, tuple[str, ...]]:
    where = f"{CONFIG_FILE}:quantization"
    if not isinstance(block, dict):
        raise FormatError(f"{where} must be an object, got {block!r}")
    algo = block.get("quant_algo")
    if not isinstance(algo, str):
        raise FormatError(f"{where}: quant_algo must be a string, got {algo!r}")
    if algo not in KNOWN_ALGOS:
        raise FormatError(f"{where}: unknown quant_algo {algo!r}; TensorRT-LLM takes {list(KNOWN_ALGOS)}")
    if algo not in (ALGO_FP8, ALGO_FP8_PER_CHANNEL_PER_TOKEN, ALGO_W4A16_AWQ):
        raise UnsupportedError(f"{where}: quant_algo {algo!r} is not one bitsmith reads")
    if (kv := block.get("kv_cache_quant_algo")) is not None:
        raise UnsupportedError(f"{where}: a quantized KV cache ({kv!r}) is not read by bitsmith")
    for key in ("has_zero_point", "pre_quant_scale"):
        value = block.get(key, False)
        if type(value) is not bool:
            raise FormatError(f"{where}: {key} must be true/false, got {value!r}")
        if value:
            raise UnsupportedError(f"{where}: {key} true is not a layout bitsmith reads")
    exclude = block.get("exclude_modules") or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) and e for e in exclude):
        raise FormatError(f"{where}: exclude_modules must be a list of module names, got {exclude!r}")
    group_size = block.get("group_size")
    if algo == ALGO_W4A16_AWQ and (type(group_size) is not int or group_size <= 0):
        raise FormatError(f"{where}: group_size must be a positive integer, got {group_size!r}")
    return algo, group_size if algo == ALGO_W4A16_AWQ else None, tuple(exclude)


def _shapes(params: TRTLLMParams) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """TensorRT-LLM linear name → (N, K, the N of each fused HF part)."""
    d = params.dims
    hidden, inter, hs = d["hidden_size"], d["intermediate_size"], d["head_size"]
    q, kv = d["num_attention_heads"] * hs, d["num_key_value_heads"] * hs
    local = {"attention.qkv": (q + 2 * kv, hidden, (q, kv, kv)), "attention.dense": (hidden, q, (hidden,)),
             "mlp.fc": (inter, hidden, (inter,)), "mlp.gate": (inter, hidden, (inter,)),
             "mlp.proj": (hidden, inter, (hidden,))}
    return {linear.name: local[linear.name.split(".", 3)[3]] for linear in trt_linears(d["num_hidden_layers"])}


def _expect(infos: Mapping[str, TensorInfo], name: str, dtypes: Sequence[str], shapes: Sequence[tuple[int, ...]]
            ) -> TensorInfo:
    return expect_tensor(infos.get(name), f"{RANK_FILE}: tensor {name!r}", dtypes, shapes, name_file=False)


def _linear_infos(name: str, n: int, k: int, infos: Mapping[str, TensorInfo], params: TRTLLMParams,
                  float_dtypes: Sequence[str]) -> tuple[bool, dict[str, TensorInfo]]:
    """(quantized?, suffix → info) of one linear, from the headers alone."""
    weight = infos.get(f"{name}.{WEIGHT}")
    if weight is None:
        raise FormatError(f"{RANK_FILE}: tensor {name}.{WEIGHT!r} is missing")
    parts: dict[str, TensorInfo] = {}
    if f"{name}.{BIAS}" in infos:
        parts[BIAS] = _expect(infos, f"{name}.{BIAS}", float_dtypes, [(n,)])
    matches = [p for p in params.exclude_modules if fnmatch.fnmatchcase(name, p)]
    if weight.dtype in float_dtypes:
        if not matches:
            raise FormatError(f"linear {name!r} is float but not in exclude_modules; consumers would expect "
                              f"{params.quant_algo} tensors for it")
        parts[WEIGHT] = _expect(infos, f"{name}.{WEIGHT}", float_dtypes, [(n, k)])
        return False, parts
    if matches:
        raise FormatError(f"linear {name!r} is quantized but matches exclude_modules {matches}")
    if params.quant_algo == ALGO_W4A16_AWQ:
        assert params.group_size is not None
        if k % params.group_size:
            raise FormatError(f"linear {name!r}: group_size {params.group_size} does not divide in_features {k}")
        parts[WEIGHT] = _expect(infos, f"{name}.{WEIGHT}", (ST_INT8,), [(n // 2, k)])
        parts[WEIGHTS_SCALING_FACTOR] = _expect(infos, f"{name}.{WEIGHTS_SCALING_FACTOR}", SCALE_DTYPES,
                                                [(n, k // params.group_size)])
        return True, parts
    parts[WEIGHT] = _expect(infos, f"{name}.{WEIGHT}", (ST_FP8,), [(n, k)])
    if params.quant_algo == ALGO_FP8:
        parts[WEIGHTS_SCALING_FACTOR] = _expect(infos, f"{name}.{WEIGHTS_SCALING_FACTOR}", (ST_FLOAT32,), [(1,), ()])
        parts[ACTIVATION_SCALING_FACTOR] = _expect(infos, f"{name}.{ACTIVATION_SCALING_FACTOR}", (ST_FLOAT32,),
                                                   [(1,), ()])
    else:
        parts[PER_CHANNEL_SCALE] = _expect(infos, f"{name}.{PER_CHANNEL_SCALE}", (ST_FLOAT32,), [(n,)])
    return True, parts


def _fused_weight(name: str, t: Mapping[str, torch.Tensor], params: TRTLLMParams) -> FP8Weight | QuantizedWeight:
    if params.quant_algo == ALGO_W4A16_AWQ:
        assert params.group_size is not None
        if not torch.isfinite(t[WEIGHTS_SCALING_FACTOR]).all():
            raise FormatError(f"linear {name!r}: {WEIGHTS_SCALING_FACTOR} must be finite")
        return int4_weight(unpack_int4_rows(t[WEIGHT].view(torch.uint8)), t[WEIGHTS_SCALING_FACTOR].float(),
                           params.group_size)
    if not torch.isfinite(t[WEIGHT].float()).all():
        raise FormatError(f"linear {name!r}: {WEIGHT} holds NaN")
    per_channel = params.quant_algo == ALGO_FP8_PER_CHANNEL_PER_TOKEN
    scale = t[PER_CHANNEL_SCALE if per_channel else WEIGHTS_SCALING_FACTOR]
    input_scale = None if per_channel else t[ACTIVATION_SCALING_FACTOR]
    for what, value in (("weight scale", scale), ("activation scale", input_scale)):
        if value is not None and not (torch.isfinite(value).all() and (value > 0).all()):
            raise FormatError(f"linear {name!r}: {what} must be finite and positive")
    return FP8Weight(data=t[WEIGHT], scale=scale.float().reshape(-1), scheme=fp8_scheme(params.quant_algo),
                     input_scale=None if input_scale is None else input_scale.float().reshape(1))


def _split(weight: FP8Weight | QuantizedWeight, sizes: Sequence[int]) -> list[FP8Weight | QuantizedWeight]:
    """The HF parts of a fused weight (rows in order)."""
    out: list[FP8Weight | QuantizedWeight] = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        if isinstance(weight, FP8Weight):
            out.append(weight.rows(rows))
        else:
            out.append(QuantizedWeight(codes=weight.codes[rows], scales=weight.scales[rows], zeros=weight.zeros[rows],
                                       g_idx=weight.g_idx, scheme=weight.scheme))
        start += size
    return out


def read_trtllm(path: Path) -> TRTLLMCheckpoint:
    """Validate and load the single-rank TensorRT-LLM checkpoint directory `path`."""
    path = Path(path)
    config = read_json_object(path / CONFIG_FILE, missing=f"TensorRT-LLM checkpoint {path} has no {CONFIG_FILE}")
    params = parse_config(config)
    try:
        header = read_header(path / RANK_FILE)
    except NotFoundError as e:
        raise FormatError(f"TensorRT-LLM checkpoint {path} has no {RANK_FILE}") from e
    if header.metadata and header.metadata.get("format") not in PT_METADATA.values():
        raise FormatError(f"{header.file}: metadata format {header.metadata.get('format')!r} is not 'pt'")
    infos = header.tensors
    float_dtypes = tuple(FLOAT_DTYPES.values())
    d = params.dims
    plain = trt_to_hf_norms(d["num_hidden_layers"])
    plain_shapes = {EMBED: (d["vocab_size"], d["hidden_size"]), LM_HEAD_WEIGHT: (d["vocab_size"], d["hidden_size"]),
                    FINAL_NORM: (d["hidden_size"],)}
    owned: set[str] = set()
    for trt in plain:
        _expect(infos, trt, float_dtypes, [plain_shapes.get(trt, (d["hidden_size"],))])
        owned.add(trt)
    shapes = _shapes(params)
    linear_parts: dict[str, tuple[bool, dict[str, TensorInfo]]] = {}
    for name, (n, k, _) in shapes.items():
        linear_parts[name] = _linear_infos(name, n, k, infos, params, float_dtypes)
        owned.update(info.name for info in linear_parts[name][1].values())
    if stray := sorted(set(infos) - owned):
        raise FormatError(f"{RANK_FILE}: tensor {stray[0]!r} is not part of a {config['architecture']} checkpoint")

    loaded = load_tensors(infos.values())
    tensors = {hf: loaded[trt] for trt, hf in plain.items()}
    if params.tied and torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
        del tensors["lm_head.weight"]  # a copy the writer made for TensorRT-LLM; the HF model ties it
    quantized: dict[str, FP8Weight | QuantizedWeight] = {}
    for linear in trt_linears(d["num_hidden_layers"]):
        is_quantized, parts = linear_parts[linear.name]
        _, _, sizes = shapes[linear.name]
        t = {suffix: loaded[info.name] for suffix, info in parts.items()}
        if BIAS in t:
            tensors.update(_split_plain(linear, t[BIAS], sizes, BIAS))
        if is_quantized:
            quantized.update(zip(linear.parts, _split(_fused_weight(linear.name, t, params), sizes), strict=True))
        else:
            tensors.update(_split_plain(linear, t[WEIGHT], sizes, WEIGHT))
    return TRTLLMCheckpoint(path=path, config=config, params=params, quantized=quantized, tensors=tensors)


def _split_plain(linear: TRTLinear, tensor: torch.Tensor, sizes: Sequence[int], suffix: str) -> dict[str, torch.Tensor]:
    chunks = torch.split(tensor, list(sizes))
    return {f"{part}.{suffix}": chunk.contiguous() for part, chunk in zip(linear.parts, chunks, strict=True)}
