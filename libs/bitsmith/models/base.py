"""Architecture adapters as data, and a checkpoint opened block by block.

An `ArchAdapter` says where an architecture keeps its tensors (name templates with ``{bid}``), which
linears share an input (and so one Hessian), which norms feed which linears, and which linears carry a
bias. Everything that computes — the decoder layer, rotary embeddings, the causal mask, grouped-query
attention — is transformers' own code, so our block forward is the model's forward, not a re-derivation.

`load_checkpoint` validates a checkpoint directory *before* it loads weights (config, supported
architecture, sane dimensions, every safetensors header, every required tensor's shape, finiteness)
and returns a `CheckpointModel` that keeps only the embedding resident, on the host, and materialises
one decoder block at a time on the compute device, so calibrating a model needs device memory for one
block, not the model: a model larger than a GPU calibrates on it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import ConfigError, FormatError, NotFoundError, UnsupportedError
from bitsmith.formats.safetensors_io import scan_checkpoint

DIMENSION_LIMITS: Mapping[str, int] = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "num_hidden_layers": 1 << 12,
    "vocab_size": 1 << 23,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 26,
}
"""Upper bounds far above any real model: a config past them is corrupt or hostile, and is refused
before anything is allocated for it."""

OPTIONAL_DIMENSIONS = frozenset({"head_dim", "max_position_embeddings"})

MAX_JSON_DEPTH = 32
"""A config nests a few levels (rope_parameters, quantization_config); transformers copies and compares
configs recursively, so a deeply nested value would exhaust the stack there."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""The safetensors dtypes a dense checkpoint's weights may have: an integer (or fp8) tensor where the model
declares a float parameter is another kind of file, and read as floats it would be garbage."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SmoothPair:
    """One AWQ scaling group: an op (`smooth`, a norm or a linear) and the `balance` linears that read its output.

    Dividing channel c of smooth's output by s[c] and multiplying the input columns of every balance linear that
    read channel c by s[c] leaves the block computing the same function. Nothing else may read smooth's output.
    `inspect` is the block module whose output AWQ's scale search compares: it holds every balance linear, and
    its one input is what they read (the attention for q/k/v, the MLP for gate/up, the linear itself for a single
    balance linear). `repeat_kv` marks a balance linear whose input is smooth's output with each key/value head
    repeated for its group of query heads: o_proj reading v_proj under grouped-query attention, where one scale
    of v's channel d of KV head g multiplies o's columns of channel d of every query head in group g.
    """

    smooth: str
    balance: tuple[str, ...]
    inspect: str
    repeat_kv: bool = False


LLAMA_SMOOTH_PAIRS = (
    SmoothPair(
        smooth="input_layernorm",
        balance=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        inspect="self_attn",
    ),
    SmoothPair(smooth="self_attn.v_proj", balance=("self_attn.o_proj",), inspect="self_attn.o_proj", repeat_kv=True),
    SmoothPair(smooth="post_attention_layernorm", balance=("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    SmoothPair(smooth="mlp.up_proj", balance=("mlp.down_proj",), inspect="mlp.down_proj"),
)
"""The llama block's scaling groups, in block order (what AutoAWQ and llm-compressor map for llama)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchAdapter:
    """Where one architecture keeps its tensors; a new architecture is one more instance.

    `groups` lists the linears of a block by shared input in true-sequential order: each inner tuple
    is solved against one Hessian. `bias_flags` maps a linear to ``True`` (always biased), or to the
    name of the config flag that decides it (llama's ``attention_bias``). `smooth_pairs` are AWQ's
    scaling groups, norms and linears alike (see `SmoothPair`). `attention` is the block's attention module,
    which runs with the causal mask and rotary embeddings; `score_linears` are the linears whose outputs meet
    only inside the attention scores (q and k), where a linear's own output error says little.
    """

    model_type: str
    architectures: tuple[str, ...]
    causal_lm_class: str
    block_prefix: str = "model.layers.{bid}"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    bias_flags: Mapping[str, bool | str] = field(default_factory=dict)
    smooth_pairs: tuple[SmoothPair, ...] = LLAMA_SMOOTH_PAIRS
    attention: str = "self_attn"
    score_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    @property
    def linears(self) -> tuple[str, ...]:
        """Block-local linear names, flattened in true-sequential order."""
        return tuple(name for group in self.groups for name in group)

    def block_name(self, bid: int, local: str) -> str:
        """Full module name of a block-local name: ``model.layers.3.self_attn.q_proj``."""
        return f"{self.block_prefix.format(bid=bid)}.{local}"

    def has_bias(self, local: str, config: Any) -> bool:
        """Whether the linear `local` carries a bias under `config`."""
        flag = self.bias_flags.get(local, False)
        return bool(getattr(config, flag, False)) if isinstance(flag, str) else flag


_ADAPTERS: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    """Record an architecture under its `model_type`; a second registration of a type is a bug."""
    if adapter.model_type in _ADAPTERS:
        raise ConfigError(f"architecture {adapter.model_type!r} is already registered")
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_architectures() -> tuple[str, ...]:
    """The `model_type`s bitsmith can open, sorted."""
    return tuple(sorted(_ADAPTERS))


def preload() -> None:
    """Import transformers' model code of every supported architecture.

    Why: the first checkpoint a process opens imports it otherwise (transformers' model base, its
    tensor-parallel and generation machinery, the architecture's module: 2 s on a laptop core, about 10 s
    with CUDA's torch), inside a job's Submit or last step. A service that opens checkpoints calls this
    as it starts, before it reports itself ready.
    """
    import transformers

    for adapter in _ADAPTERS.values():
        getattr(transformers, adapter.causal_lm_class)


def get_adapter(model_type: str) -> ArchAdapter:
    """The adapter for `model_type`, or `UnsupportedError` listing the supported ones."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:  # brackets nested thousands deep: no config looks like that
        raise FormatError(f"{path} nests JSON too deeply to be a config") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if _nested_deeper(data, MAX_JSON_DEPTH):
        raise FormatError(f"{path} nests values more than {MAX_JSON_DEPTH} levels deep")
    return data


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/objects more than `limit` levels (recursion bounded by `limit`)."""
    if not isinstance(value, dict | list):
        return False
    if limit == 0:
        return True
    return any(_nested_deeper(item, limit - 1) for item in (value.values() if isinstance(value, dict) else value))


def _check_dimensions(raw: Mapping[str, Any], path: Path) -> None:
    for key, limit in DIMENSION_LIMITS.items():
        value = raw.get(key)
        if value is None and (key in OPTIONAL_DIMENSIONS or key == "num_key_value_heads"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise FormatError(f"{path}: {key} must be an integer in [1, {limit}], got {value!r}")
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise FormatError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if raw.get("head_dim") is None and raw["hidden_size"] % heads:
        raise FormatError(f"{path}: hidden_size {raw['hidden_size']} is not divisible by {heads} heads")


def _check_scalars(raw: Mapping[str, Any], path: Path) -> None:
    """The norm epsilon and RoPE base (a NaN, infinite or non-positive one gives a model that computes NaN),
    and the dtype name, which transformers looks up on torch and prints back without checking either."""
    for key in ("dtype", "torch_dtype"):
        name = raw.get(key)
        if name is not None and not (isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)):
            raise FormatError(f"{path}: {key} must name a torch dtype (\"bfloat16\"), got {name!r}")
    pad, vocab = raw.get("pad_token_id"), raw["vocab_size"]
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not -vocab <= pad < vocab):
        raise FormatError(f"{path}: pad_token_id {pad!r} is not a token of the {vocab}-token vocabulary")
    rope = raw.get("rope_parameters")
    values = {"rms_norm_eps": raw.get("rms_norm_eps"), "rope_theta": raw.get("rope_theta"),
              "rope_parameters.rope_theta": rope.get("rope_theta") if isinstance(rope, dict) else None}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise FormatError(f"{path}: {key} must be a finite positive number, got {value!r}")


def read_config(model_dir: str | Path) -> tuple[Any, ArchAdapter]:
    """Parse and validate `config.json` of a checkpoint into a transformers config and its adapter
    (see `parse_config`)."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is a file; a model is a checkpoint directory (config.json and safetensors)")
    if not model_dir.is_dir():
        raise NotFoundError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    return parse_config(_read_json(path), path)


def parse_config(raw: Mapping[str, Any], path: Path) -> tuple[Any, ArchAdapter]:
    """Validate an HF-style config (`path` names it in errors) into a transformers config and its adapter.

    Checked: a supported architecture, dimensions within `DIMENSION_LIMITS`, a finite positive norm epsilon
    and RoPE base, fields transformers accepts, and a model transformers can build from them (one block of
    it, on the meta device: an unknown activation or RoPE type fails here, not mid-job, and a config that
    claims thousands of blocks costs no more to check than one that has one). Any ``quantization_config`` is
    dropped: it describes an artifact's packing, and the dense model we build from it must not be
    re-quantized by transformers.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise FormatError(f"{path}: model_type is missing")
    adapter = get_adapter(model_type)
    architectures = raw.get("architectures") or list(adapter.architectures)
    if not isinstance(architectures, list) or not all(isinstance(arch, str) for arch in architectures):
        raise FormatError(f"{path}: architectures must be a list of class names, got {architectures!r}")
    unknown = [arch for arch in architectures if arch not in adapter.architectures]
    if unknown:
        raise UnsupportedError(
            f"{path}: architectures {unknown} are not supported for model_type {model_type!r} "
            f"(expected one of {list(adapter.architectures)})"
        )
    _check_dimensions(raw, path)
    _check_scalars(raw, path)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "quantization_config")}
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, AttributeError, StrictDataclassError) as exc:
        raise FormatError(f"{path}: transformers rejects this config: {exc}") from exc
    config._attn_implementation = "sdpa"
    one_block = copy.deepcopy(config)
    one_block.num_hidden_layers = 1
    _build_model(one_block, adapter, path, device="meta")
    return config, adapter


def _build_model(config: Any, adapter: ArchAdapter, path: Path, *, device: str) -> torch.nn.Module:
    """The architecture's transformers model of `config` on `device`; a config it cannot build is a
    `FormatError` naming `path` (transformers raises TypeError/KeyError for an unknown activation or RoPE
    type only when a layer is built)."""
    import transformers

    try:
        with torch.device(device):
            model: torch.nn.Module = getattr(transformers, adapter.causal_lm_class)(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise FormatError(f"{path}: transformers cannot build a {adapter.model_type} model from it: {exc!r}") from exc
    return model


def meta_state_shapes(config: Any, adapter: ArchAdapter, path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture's transformers class declares, with its shape, at zero cost (`path`:
    the config, named in errors)."""
    model = _build_model(config, adapter, path, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class TensorIndex:
    """Where every tensor of a checkpoint lives (single file or shards), validated header-first.

    Headers go through `scan_checkpoint`, which bounds every number in them against the file before
    anything is mapped and names the file and tensor at fault (the safetensors library names neither).
    """

    def __init__(self, model_dir: Path) -> None:
        infos = scan_checkpoint(model_dir)
        self._files: dict[str, Path] = {name: info.file for name, info in infos.items()}
        self._shapes: dict[str, tuple[int, ...]] = {name: info.shape for name, info in infos.items()}
        self._dtypes: dict[str, str] = {name: info.dtype for name, info in infos.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype code (``BF16``) the tensor is stored in."""
        return self._dtypes[name]

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Load one tensor as float32 on `device`.

        The checkpoint's dtype (bf16 for most) crosses to the device and is widened there, so a GPU
        read moves half the bytes of a float32 one and the host never holds a float32 copy.
        """
        return self.read_stored(name).to(device=device).to(dtype=torch.float32)

    def read_stored(self, name: str) -> torch.Tensor:
        """Load one tensor on the host in the dtype the checkpoint stores it in."""
        from safetensors import safe_open

        try:
            path = self._files[name]
        except KeyError:
            raise NotFoundError(f"tensor {name} is not in the checkpoint") from None
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, file by file, so a full scan holds one tensor at a time."""
        for name in self._files:
            yield name, self.read(name)


def _check_tensors(
    index: TensorIndex, config: Any, adapter: ArchAdapter, model_dir: Path, *, check_finite: bool = True
) -> None:
    last_block = adapter.block_name(int(config.num_hidden_layers) - 1, adapter.linears[0]) + ".weight"
    if last_block not in index:  # before the model of the config is built: it may claim thousands of blocks
        raise FormatError(f"{model_dir}: required tensor {last_block} is missing "
                          f"(the config has {config.num_hidden_layers} blocks)")
    expected = meta_state_shapes(config, adapter, model_dir / "config.json")
    if getattr(config, "tie_word_embeddings", False):
        expected.pop(adapter.lm_head, None)
    for name, shape in expected.items():
        if name not in index:
            raise FormatError(f"{model_dir}: required tensor {name} is missing")
        if index.shape(name) != shape:
            raise FormatError(f"{model_dir}: tensor {name} has shape {index.shape(name)}, expected {shape}")
        if index.dtype(name) not in FLOAT_DTYPES:
            raise FormatError(f"{model_dir}: tensor {name} is stored as {index.dtype(name)}; a checkpoint's "
                              f"weights are one of {sorted(FLOAT_DTYPES)}")
    for name in index.names() if check_finite else ():
        if not _all_finite(index.read_stored(name)):
            raise FormatError(f"{model_dir}: tensor {name} contains NaN or Inf")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or ±Inf, in one pass over the stored dtype.

    min and max propagate NaN, and an infinity is an extreme: so the two extremes being finite is the
    whole check, and it allocates nothing the size of the tensor. Widening to float32 and masking with
    `isfinite` instead took 9 to 12 s for a 2.8 GB checkpoint on two cores, against 0.1 to 0.2 s.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


class CheckpointModel:
    """A validated checkpoint, run one decoder block at a time in `compute_dtype` (float32 or bfloat16).

    The weights stay in the checkpoint's files (memory-mapped) and the embedding on the host; only the
    rotary tables and the final norm live on the compute device. `block_forward` materialises the
    block it is asked for there (keeping just that one cached), so a loop over blocks holds one
    block's weights on the device. Activations may stay on the host: each call moves its batch to the
    device, and its caller decides where the result goes.
    """

    def __init__(
        self,
        model_dir: Path,
        config: Any,
        adapter: ArchAdapter,
        index: TensorIndex,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        import transformers

        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"blocks compute in float32 or bfloat16, not {compute_dtype}")
        self.model_dir = model_dir
        self.config = config
        self.adapter = adapter
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._index = index
        self._embed = index.read_stored(adapter.embed)  # as stored: only the rows looked up are converted
        with torch.device("meta"):
            skeleton = getattr(transformers, adapter.causal_lm_class)(config)
        self._layer_cls = type(skeleton.model.layers[0])
        self._rotary = type(skeleton.model.rotary_emb)(config=config).to(self.device)
        self._norm = type(skeleton.model.norm)(config.hidden_size, eps=config.rms_norm_eps).to(self.device)
        self._cached: tuple[int, torch.nn.Module] | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def groups(self, bid: int) -> list[list[str]]:
        """Block-local linear names grouped by shared input, in true-sequential order."""
        self._check_bid(bid)
        return [list(group) for group in self.adapter.groups]

    def full_name(self, bid: int, local: str) -> str:
        self._check_bid(bid)
        return self.adapter.block_name(bid, local)

    def linear_weight(self, bid: int, local: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The checkpoint's weight of one linear, float32 [N, K] on `device` (default: the compute device)."""
        return self._index.read(self._linear_key(bid, local, "weight"), self.device if device is None else device)

    def linear_shape(self, bid: int, local: str) -> tuple[int, int]:
        """(out_features, in_features) of one linear, from the checkpoint header (no tensor is read)."""
        out_features, in_features = self._index.shape(self._linear_key(bid, local, "weight"))
        return int(out_features), int(in_features)

    def linear_bias(self, bid: int, local: str) -> torch.Tensor | None:
        """The linear's bias (float32 [N]), or None for an unbiased linear."""
        key = self._linear_key(bid, local, "bias")
        return self._index.read(key, self.device) if key in self._index else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [S, L, H] in the compute dtype, on the host.

        The blocks compute in that dtype anyway, and a calibration set's activations are large (128 x 2048
        tokens of a 4096-wide model: 4.3 GB in float32, 2.1 GB in bfloat16): the caller decides where they
        live (host or device memory) and each block sees one batch of them at a time. The rows are looked
        up in the checkpoint's dtype and converted once, so no float32 copy of the table or of the rows is
        made on the way to bfloat16.
        """
        return torch.nn.functional.embedding(input_ids.cpu(), self._embed).to(self.compute_dtype)

    def block_forward(
        self, bid: int, hidden: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Run decoder block `bid` (transformers' own layer, causal, rotary) on `hidden` [S, L, H].

        `overrides` maps block-local parameter names (``self_attn.q_proj.weight``,
        ``input_layernorm.weight``) to values used instead of the checkpoint's, without modifying the
        cached block: this is how quantized weights and AWQ's rescaled weights and norms are applied.
        """
        layer = self.block_module(bid)
        params = self._override_params(bid, layer, overrides or {})
        hidden = hidden.to(device=self.device, dtype=self.compute_dtype)
        with torch.no_grad():
            out = torch.func.functional_call(layer, params, (hidden,), self._context(hidden), strict=False)
        return out[0] if isinstance(out, tuple) else out

    def module_forward(
        self, bid: int, local: str, hidden: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Run one module of block `bid` (``self_attn``, ``mlp``, ``mlp.down_proj``) on its input `hidden`.

        `hidden` is what the module reads inside the block, [S, L, K]; the attention module gets the block's
        causal mask and rotary embeddings as in `block_forward`. `overrides` are block-local parameter names,
        as in `block_forward`; those outside the module are refused.
        """
        layer = self.block_module(bid)
        try:
            module = layer.get_submodule(local)
        except AttributeError:
            raise ConfigError(f"block {bid}: {local!r} is not a module of a {self.adapter.model_type} block") from None
        params = self._override_params(bid, layer, overrides or {})
        prefix = local + "."
        outside = sorted(name for name in params if not name.startswith(prefix))
        if outside:
            raise ConfigError(f"block {bid}: overrides {outside} are not parameters of {local}")
        params = {name[len(prefix) :]: value for name, value in params.items()}
        hidden = hidden.to(device=self.device, dtype=self.compute_dtype)
        kwargs = self._context(hidden) if local == self.adapter.attention else {}
        with torch.no_grad():
            out = torch.func.functional_call(module, params, (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def block_tensor(self, bid: int, name: str) -> torch.Tensor:
        """A block-local parameter of the checkpoint (``input_layernorm.weight``), float32 on the compute device."""
        key = self.full_name(bid, name)
        if key not in self._index:
            raise ConfigError(f"block {bid}: {name!r} is not a tensor of a {self.adapter.model_type} block")
        return self._index.read(key, self.device)

    def _context(self, hidden: torch.Tensor) -> dict[str, Any]:
        """What the decoder layer (and its attention) is called with: causal mask, positions, rotary tables."""
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=positions,
        )
        return {
            "attention_mask": mask,
            "position_ids": positions,
            "position_embeddings": self._rotary(hidden, positions),
        }

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits [S, L, V] from the last block's output (read on demand)."""
        tied = self.adapter.lm_head not in self._index
        lm_head = self._embed.to(self.device).float() if tied else self._index.read(self.adapter.lm_head, self.device)
        with torch.no_grad():
            self._norm.weight.copy_(self._index.read(self.adapter.final_norm))
            return self._norm(hidden.to(device=self.device, dtype=torch.float32)) @ lm_head.T

    def block_module(self, bid: int) -> torch.nn.Module:
        """The decoder layer of block `bid` with its checkpoint weights (one block cached at a time)."""
        self._check_bid(bid)
        if self._cached is not None and self._cached[0] == bid:
            return self._cached[1]
        self._cached = None
        # Built without storage, then given the checkpoint's tensors: no throw-away random init, and
        # the previous block is released before this one is read onto the device.
        with torch.device("meta"):
            layer = self._layer_cls(self.config, layer_idx=bid)
        prefix = self.adapter.block_prefix.format(bid=bid) + "."
        state = {name: self._index.read(prefix + name, self.device).to(self.compute_dtype)
                 for name in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        unset = [name for name, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if unset:
            raise FormatError(f"block {bid}: {self.adapter.model_type} layer tensors {unset} are not in the checkpoint")
        layer.eval()
        self._cached = (bid, layer)
        return layer

    def _override_params(
        self, bid: int, layer: torch.nn.Module, overrides: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        current = dict(layer.named_parameters())
        params = {}
        for name, value in overrides.items():
            if name not in current:
                raise ConfigError(f"block {bid}: {name!r} is not a parameter of a {self.adapter.model_type} block")
            if tuple(value.shape) != tuple(current[name].shape):
                raise ConfigError(
                    f"{self.full_name(bid, name)}: override has shape {tuple(value.shape)}, "
                    f"expected {tuple(current[name].shape)}"
                )
            params[name] = value.to(device=self.device, dtype=self.compute_dtype)
        return params

    def _linear_key(self, bid: int, local: str, kind: str) -> str:
        if local not in self.adapter.linears:
            raise ConfigError(f"{local!r} is not a linear of {self.adapter.model_type}: {self.adapter.linears}")
        return f"{self.full_name(bid, local)}.{kind}"

    def _check_bid(self, bid: int) -> None:
        if not 0 <= bid < self.num_blocks:
            raise ConfigError(f"block {bid} is out of range: the model has {self.num_blocks} blocks")


def load_checkpoint(
    model_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    check_finite: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> CheckpointModel:
    """Validate a checkpoint directory, then open it for block-by-block use.

    Headers, names and shapes are always checked without reading weights; `check_finite` also
    streams every tensor once (one at a time) to refuse NaN/Inf before any work starts. A caller
    that has verified the checkpoint already (a worker re-opening it) may skip that read.

    >>> from bitsmith.demo import DEMO_MODEL
    >>> model = load_checkpoint(DEMO_MODEL)
    >>> model.num_blocks, model.full_name(3, "self_attn.q_proj")
    (4, 'model.layers.3.self_attn.q_proj')
    """
    model_dir = Path(model_dir)
    config, adapter = read_config(model_dir)
    index = TensorIndex(model_dir)
    _check_tensors(index, config, adapter, model_dir, check_finite=check_finite)
    return CheckpointModel(model_dir, config, adapter, index, device, compute_dtype)


def build_causal_lm(model_dir: str | Path, state_dict: Mapping[str, torch.Tensor], *,
                    config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The transformers model of `model_dir`'s config, float32, eval mode, with the given dense weights.

    Used to evaluate an artifact whose quantized linears a format reader has dequantized. `config` is the
    HF config where the artifact's own config.json is not one (a TensorRT-LLM checkpoint). With tied
    embeddings the state dict may omit the LM head. Loading is strict: a missing or unexpected tensor
    is a `FormatError` naming it.
    """
    config, adapter = _config(model_dir, config)
    weights = {name: tensor.float() for name, tensor in state_dict.items()}
    if getattr(config, "tie_word_embeddings", False) and adapter.lm_head not in weights and adapter.embed in weights:
        weights[adapter.lm_head] = weights[adapter.embed]
    model = _build_model(config, adapter, Path(model_dir) / "config.json", device="cpu").to(torch.float32)
    missing, unexpected = (
        sorted(set(model.state_dict()) - set(weights)),
        sorted(set(weights) - set(model.state_dict())),
    )
    if missing or unexpected:
        raise FormatError(f"{model_dir}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"{model_dir}: weights do not fit the model: {exc}") from exc
    return model.eval()


def meta_causal_lm(model_dir: str | Path, *, config: Mapping[str, Any] | None = None
                   ) -> tuple[torch.nn.Module, Any, ArchAdapter]:
    """The transformers model of `model_dir`'s config (or of `config`, as `build_causal_lm`) on the meta
    device (nothing allocated), with the config and adapter: a skeleton for a loader that fills each
    tensor itself, on the device and in the layout it wants, rather than building the float model first."""
    config, adapter = _config(model_dir, config)
    return _build_model(config, adapter, Path(model_dir) / "config.json", device="meta"), config, adapter


def _config(model_dir: str | Path, raw: Mapping[str, Any] | None) -> tuple[Any, ArchAdapter]:
    return read_config(model_dir) if raw is None else parse_config(raw, Path(model_dir) / "config.json")


def load_causal_lm(model_dir: str | Path) -> torch.nn.Module:
    """The checkpoint as a float32 transformers causal LM in eval mode (validated like `load_checkpoint`)."""
    model_dir = Path(model_dir)
    config, adapter = read_config(model_dir)
    index = TensorIndex(model_dir)
    _check_tensors(index, config, adapter, model_dir)
    return build_causal_lm(model_dir, dict(index.iter_tensors()))
