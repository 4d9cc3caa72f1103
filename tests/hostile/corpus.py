"""The corpus of hostile inputs: each one built in a temporary directory from the demo model (nothing large is
checked in), with the status code it must get and a pattern its reason must match (the file, tensor or key at
fault).

Four kinds, by where they enter: checkpoints (a model directory a job names), recipes (wire messages), GGUF
files (an artifact a runtime is asked to run) and store keys (references a worker is handed). Each kind is a
list of `Hostile` cases whose `build` makes the input; the library tests hand it to the reader, the stack tests
to a real service.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from bitsmith.demo import DEMO_MODEL
from bitsmith.recipes import MAX_OVERRIDES
from bitsmith.v1 import common_pb2
from safetensors.torch import load_file, save_file

B = TypeVar("B")

INVALID = "INVALID_ARGUMENT"
UNSUPPORTED = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Hostile(Generic[B]):
    """One hostile input: how to build it, the status code it gets and a pattern of the reason."""

    name: str
    build: B
    code: str
    reason: str


def copy_demo(tmp: Path) -> Path:
    """A writable copy of the demo checkpoint."""
    model = tmp / "model"
    shutil.copytree(DEMO_MODEL, model)
    for file in model.iterdir():
        file.chmod(0o644)
    return model


# --- checkpoints: `build(model_dir)` mutates a copy of the demo model; returns the path a job names --------

WEIGHTS = "model.safetensors"
NORM = "model.norm.weight"


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _rewrite_header(model: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Edit the JSON header of the demo's weights, keeping the data section as it is."""
    path = model / WEIGHTS
    header, data = _split(path.read_bytes())
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return model


def _set_entry(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header[name].update(fields)


def _truncated_header(model: Path) -> Path:
    path = model / WEIGHTS
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    path.write_bytes(raw[:8 + length // 2])
    return model


def _oversized_header(model: Path) -> Path:
    path = model / WEIGHTS
    path.write_bytes(struct.pack("<Q", 2**63) + path.read_bytes()[8:])
    return model


def _offsets_past_the_data(model: Path) -> Path:
    _, data = _split((model / WEIGHTS).read_bytes())
    return _rewrite_header(model, _set_entry(NORM, data_offsets=[len(data) - 4, len(data) + 508]))


def _overlapping_tensors(model: Path) -> Path:
    first, second = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    return _rewrite_header(model, lambda header: header[second].update(data_offsets=header[first]["data_offsets"]))


def _nested_header(model: Path) -> Path:
    depth = 100_000
    encoded = b"[" * depth + b"]" * depth
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    return model


def _infinite_weight(model: Path) -> Path:
    tensors = load_file(model / WEIGHTS)
    tensors["model.layers.2.self_attn.k_proj.weight"][7, 11] = float("inf")
    save_file(tensors, model / WEIGHTS, metadata={"format": "pt"})
    return model


def _shard_outside_the_model(model: Path) -> Path:
    shard = "model-00001-of-00001.safetensors"
    names = list(load_file(model / WEIGHTS))
    (model / WEIGHTS).rename(model / shard)
    weight_map = dict.fromkeys(names, shard) | {NORM: "../../outside.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def _edit_config(**changes: Any) -> Callable[[Path], Path]:
    def edit(model: Path) -> Path:
        path = model / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return model

    return edit


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _a_file_for_a_model(model: Path) -> Path:
    file = model.parent / "model.gguf"
    file.write_bytes(b"GGUF")
    return file


CHECKPOINTS: list[Hostile[Callable[[Path], Path]]] = [
    Hostile("safetensors-truncated-header", _truncated_header, INVALID,
            r"model\.safetensors: header claims \d+ bytes but the file has \d+"),
    Hostile("safetensors-oversized-header", _oversized_header, INVALID,
            r"model\.safetensors: header claims 9223372036854775808 bytes .*limit"),
    Hostile("safetensors-huge-tensor", lambda m: _rewrite_header(m, _set_entry(NORM, shape=[2**40, 2**40])), INVALID,
            r"model\.safetensors: tensor 'model\.norm\.weight': 512 bytes stored, shape \[1099511627776, "),
    Hostile("safetensors-offsets-past-the-data", _offsets_past_the_data, INVALID,
            r"tensor 'model\.norm\.weight': data_offsets \[\d+, \d+\] outside the \d+-byte data section"),
    Hostile("safetensors-overlapping-tensors", _overlapping_tensors, INVALID,
            r"model\.safetensors: tensor 'model\.layers\.\d\.input_layernorm\.weight' starts at \d+, expected \d+"),
    Hostile("safetensors-unknown-dtype", lambda m: _rewrite_header(m, _set_entry(NORM, dtype="Q4")), INVALID,
            r"tensor 'model\.norm\.weight': unsupported dtype 'Q4'"),
    Hostile("safetensors-integer-weights",
            lambda m: _rewrite_header(m, _set_entry("model.layers.0.mlp.up_proj.weight", dtype="I16")), INVALID,
            r"model\.layers\.0\.mlp\.up_proj\.weight is stored as I16"),
    Hostile("safetensors-nested-header", _nested_header, INVALID, r"model\.safetensors: header nests JSON too deeply"),
    Hostile("infinite-weight", _infinite_weight, INVALID,
            r"tensor model\.layers\.2\.self_attn\.k_proj\.weight contains NaN or Inf"),
    Hostile("index-shard-outside-the-model", _shard_outside_the_model, INVALID,
            r"index\.json: tensor 'model\.norm\.weight' maps to '\.\./\.\./outside\.safetensors', not a plain file"),
    Hostile("config-absurd-hidden-size", _edit_config(hidden_size=10**9), INVALID,
            r"config\.json: hidden_size must be an integer in \[1, 131072\], got 1000000000"),
    Hostile("config-absurd-layer-count", _edit_config(num_hidden_layers=2**40), INVALID,
            r"config\.json: num_hidden_layers must be an integer in \[1, 4096\]"),
    Hostile("config-negative-vocab", _edit_config(vocab_size=-4096), INVALID,
            r"config\.json: vocab_size must be an integer in \[1, \d+\], got -4096"),
    Hostile("config-more-blocks-than-tensors", _edit_config(num_hidden_layers=4000), INVALID,
            r"tensor model\.layers\.3999\.self_attn\.q_proj\.weight is missing \(the config has 4000 blocks\)"),
    Hostile("config-pad-outside-vocab", _edit_config(pad_token_id=4096), INVALID,
            r"config\.json: pad_token_id 4096 is not a token of the 4096-token vocabulary"),
    Hostile("config-unknown-dtype", _edit_config(dtype="float31"), INVALID,
            r"config\.json: dtype must name a torch dtype \(\"bfloat16\"\), got 'float31'"),
    Hostile("config-nan-epsilon", _edit_config(rms_norm_eps=float("nan")), INVALID,
            r"config\.json: rms_norm_eps must be a finite positive number, got nan"),
    Hostile("config-nested-value", _edit_config(rope_scaling=_nested(100)), INVALID,
            r"config\.json nests values more than 32 levels deep"),
    Hostile("config-unknown-activation", _edit_config(hidden_act="nope"), INVALID,
            r"config\.json: transformers cannot build a llama model from it: KeyError\('nope'\)"),
    Hostile("unknown-architecture", _edit_config(model_type="mamba", architectures=["MambaForCausalLM"]), UNSUPPORTED,
            r"architecture 'mamba' is not supported; supported: llama, mistral, qwen2"),
    Hostile("architecture-class-mismatch", _edit_config(architectures=["Qwen2ForCausalLM"]), UNSUPPORTED,
            r"config\.json: architectures \['Qwen2ForCausalLM'\] are not supported for model_type 'llama'"),
    Hostile("model-is-a-file", _a_file_for_a_model, INVALID,
            r"model\.gguf is a file; a model is a checkpoint directory"),
]


# --- recipes: `build(recipe)` spoils a valid wire recipe in place --------------------------------------------


def _override(pattern: str) -> Callable[[common_pb2.Recipe], None]:
    def spoil(recipe: common_pb2.Recipe) -> None:
        recipe.overrides.add(pattern=pattern, skip=True)

    return spoil


def _many_overrides(recipe: common_pb2.Recipe) -> None:
    for i in range(MAX_OVERRIDES + 1):
        recipe.overrides.add(pattern=f"layers\\.{i}\\.", skip=True)


def _ggml_override(recipe: common_pb2.Recipe) -> None:
    recipe.overrides.add(pattern="down_proj").ggml.type = "Q9_Z"


def _huge_grid_search(recipe: common_pb2.Recipe) -> None:
    recipe.gptq.grid_search.CopyFrom(common_pb2.GridSearch(steps=10**9, max_shrink=0.8, norm=2.4))


def _set(path: str, value: Any) -> Callable[[common_pb2.Recipe], None]:
    def spoil(recipe: common_pb2.Recipe) -> None:
        *parents, field = path.split(".")
        message: Any = recipe
        for parent in parents:
            message = getattr(message, parent)
        setattr(message, field, value)

    return spoil


RECIPES: list[Hostile[Callable[[common_pb2.Recipe], None]]] = [
    Hostile("recipe-nested-repetition", _override(r"(\w+\.?)+x$"), INVALID, r"nests a repetition inside a repetition"),
    Hostile("recipe-repetitions-in-sequence", _override(".*" * 8 + "x"), INVALID, r"repeats 8 times; at most 3"),
    Hostile("recipe-alternation-in-repetition", _override("(.|..)*x"), INVALID,
            r"has an alternation inside a repetition"),
    Hostile("recipe-unknown-method", _set("method", 42), INVALID, r"unknown or unspecified method 42"),
    Hostile("recipe-unsupported-bits", _set("scheme.bits", 7), INVALID, r"bits must be one of \(2, 3, 4, 8\), got 7"),
    Hostile("recipe-huge-grid-search", _huge_grid_search, INVALID,
            r"gptq\.grid_search\.steps is 1000000000; the limit is 10000"),
    Hostile("recipe-huge-awq-grid", _set("awq.grid", 2**31 - 1), INVALID, r"awq\.grid is 2147483647; the limit"),
    Hostile("recipe-too-many-overrides", _many_overrides, INVALID, rf"at most {MAX_OVERRIDES} overrides, got"),
    Hostile("recipe-unknown-ggml-type", _ggml_override, INVALID, r"unknown ggml type 'Q9_Z'"),
]


# --- GGUF files: `build(f16_bytes)` spoils a valid F16 file of the demo model --------------------------------

GGUF_HEADER = struct.Struct("<4sIQQ")
"""magic, version, tensor count, KV count."""


def _with_header(**fields: int) -> Callable[[bytes], bytes]:
    def spoil(raw: bytes) -> bytes:
        magic, version, n_tensors, n_kv = GGUF_HEADER.unpack_from(raw)
        values = {"n_tensors": n_tensors, "n_kv": n_kv, **fields}
        return GGUF_HEADER.pack(magic, version, values["n_tensors"], values["n_kv"]) + raw[GGUF_HEADER.size:]

    return spoil


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _field_after(raw: bytes, name: str) -> int:
    """The byte position right after the key or tensor name `name` in the header."""
    position = raw.index(_gguf_string(name))
    return position + len(_gguf_string(name))


def _tensor_offset_moved(raw: bytes) -> bytes:
    name = "blk.0.attn_q.weight"
    at = _field_after(raw, name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    offset_at = at + 4 + 8 * n_dims + 4
    (offset,) = struct.unpack_from("<Q", raw, offset_at)
    return raw[:offset_at] + struct.pack("<Q", offset + 2**40) + raw[offset_at + 8:]


def with_block_count(raw: bytes, blocks: int) -> bytes:
    """The file with `llama.block_count` (a uint32 after its value type) set to `blocks`."""
    at = _field_after(raw, "llama.block_count") + 4
    return raw[:at] + struct.pack("<I", blocks) + raw[at + 4:]


def _token_not_utf8(raw: bytes) -> bytes:
    at = _field_after(raw, "tokenizer.ggml.tokens") + 4 + 4 + 8  # value type, element type, count
    while struct.unpack_from("<Q", raw, at)[0] == 0:
        at += 8
    first_byte = at + 8
    return raw[:first_byte] + b"\xff" + raw[first_byte + 1:]


GGUF_FILES: list[Hostile[Callable[[bytes], bytes]]] = [
    Hostile("gguf-bad-magic", lambda raw: b"GGML" + raw[4:], INVALID, r"not a GGUF file: magic b'GGML'"),
    Hostile("gguf-absurd-tensor-count", _with_header(n_tensors=2**62), INVALID,
            r"\.gguf: tensor count 4611686018427387904 cannot fit in the \d+ bytes left at byte 8"),
    Hostile("gguf-absurd-kv-count", _with_header(n_kv=2**40), INVALID, r"\.gguf: KV count 1099511627776 cannot fit"),
    Hostile("gguf-tensor-offset-outside", _tensor_offset_moved, INVALID,
            r"tensor 'blk\.0\.attn_q\.weight' has offset \d+, expected \d+"),
    Hostile("gguf-absurd-block-count", lambda raw: with_block_count(raw, 4000), INVALID,
            r"llama\.block_count 4000 is outside llama\.cpp's 1 to 512 blocks at byte \d+"),
    Hostile("gguf-truncated-data", lambda raw: raw[:-1000], INVALID, r"truncated: tensor data ends at byte \d+"),
    Hostile("gguf-token-not-utf8", _token_not_utf8, INVALID, r"'tokenizer\.ggml\.tokens'\[\d+\] is not UTF-8"),
]


# --- store keys: `build(store_root, outside)` plants what it needs and returns the key a reference names ----


def _planted(link: str, target: Callable[[Path, Path], Path], key: str) -> Callable[[Path, Path], str]:
    def plant(root: Path, outside: Path) -> str:
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target(root, outside), root / link)
        return key

    return plant


STORE_KEYS: list[Hostile[Callable[[Path, Path], str]]] = [
    Hostile("key-parent-traversal", lambda root, outside: "../../etc/passwd", INVALID,
            r"invalid store key '\.\./\.\./etc/passwd'"),
    Hostile("key-absolute", lambda root, outside: "/etc/passwd", INVALID, r"invalid store key '/etc/passwd'"),
    Hostile("key-too-long", lambda root, outside: "jobs/" + "x" * 300, INVALID, r"is over 255 bytes"),
    Hostile("symlinked-directory-out-of-the-store",
            _planted("jobs/linked", lambda root, outside: outside, "jobs/linked/w.safetensors"), INVALID,
            r"store key 'jobs/linked/w\.safetensors' resolves to .*, outside the store root"),
    Hostile("symlinked-file-out-of-the-store",
            _planted("jobs/leaf/w.safetensors", lambda root, outside: outside / "w.safetensors",
                     "jobs/leaf/w.safetensors"), INVALID,
            r"store key 'jobs/leaf/w\.safetensors' resolves to .*, outside the store root"),
    Hostile("symlink-loop", _planted("jobs/loop", lambda root, outside: root / "jobs/loop", "jobs/loop/w.safetensors"),
            INVALID, r"store key 'jobs/loop/w\.safetensors' cannot be resolved"),
]
