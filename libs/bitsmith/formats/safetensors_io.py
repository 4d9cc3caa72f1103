"""Hugging Face style safetensors checkpoints (one file or shards + index), validated before trusted.

Why our own header check: the `safetensors` library rejects most corrupt files, but its errors do
not say which file of a checkpoint or which tensor is wrong, and a file from the wire may be hostile.
We parse the 8-byte length and the JSON header ourselves with hard bounds (header ≤ 100 MiB and
inside the file, every tensor's byte range inside the data section and equal to its shape x dtype
size, no overlaps, file size exact) and raise `FormatError` naming the file and tensor, before any
tensor is memory-mapped. Both the format readers (reading our artifacts) and the writers (reading the
source model) go through here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.errors import ConfigError, FormatError, NotFoundError

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_TEMPLATE = "model-{index:05d}-of-{total:05d}.safetensors"
PT_METADATA = {"format": "pt"}
"""transformers refuses safetensors metadata whose `format` is not pt/tf/flax/mlx (FORMATS.md §0)."""

MAX_HEADER_BYTES = 100 * 1024**2
"""safetensors' own header limit; a larger claimed header is hostile or corrupt."""

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""Element sizes of the dtypes we accept in a header; anything else is a FormatError."""

_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (byte range relative to the data section)."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def expect_tensor(
    info: TensorInfo | None,
    where: str,
    dtypes: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    *,
    name_file: bool = True,
) -> TensorInfo:
    """`info`, checked from its header alone: `FormatError` if `where` (the tensor, as messages name it) is
    missing, or is not one of `dtypes` in one of `shapes`; the message names the file holding it unless
    `name_file` is false (a format of one weights file)."""
    if info is None:
        raise FormatError(f"{where} is missing")
    if info.dtype not in dtypes or info.shape not in shapes:
        expected = " or ".join(str(list(s)) for s in shapes)
        in_file = f" ({info.file.name})" if name_file else ""
        raise FormatError(
            f"{where}{in_file} is {info.dtype} {list(info.shape)}, expected {'|'.join(dtypes)} {expected}"
        )
    return info


@dataclass(frozen=True, slots=True, kw_only=True)
class SafetensorsHeader:
    """The validated header of one file."""

    file: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and bound-check a safetensors header without trusting any number in it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_LENGTH.size)
            if len(head) < _LENGTH.size:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
            (header_len,) = _LENGTH.unpack(head)
            if header_len > MAX_HEADER_BYTES or header_len > size - _LENGTH.size:
                raise FormatError(
                    f"{path}: header claims {header_len} bytes but the file has {size} "
                    f"(limit {MAX_HEADER_BYTES}); truncated or corrupt"
                )
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise NotFoundError(f"safetensors file {path} does not exist") from e
    except OSError as e:  # a directory, a file we may not read: still the caller's input, named
        raise FormatError(f"{path}: cannot be read as a safetensors file: {e.strerror}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON: {e}") from e
    except RecursionError:  # a header of nested brackets, far deeper than any real one
        raise FormatError(f"{path}: header nests JSON too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    data_size = size - _LENGTH.size - header_len
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    _check_layout(path, tensors, data_size)
    return SafetensorsHeader(file=path, tensors=tensors, metadata=metadata)


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise FormatError(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise FormatError(f"{where}: data_offsets {offsets!r} outside the {data_size}-byte data section")
    expected = prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise FormatError(
            f"{where}: {offsets[1] - offsets[0]} bytes stored, shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(file=path, name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """Byte ranges must tile the data section exactly: no overlap, no gap, nothing after the end."""
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise FormatError(f"{path}: tensor {info.name!r} starts at {info.begin}, expected {position}")
        position = info.end
    if position != data_size:
        raise FormatError(f"{path}: tensors cover {position} bytes but the data section has {data_size}")


def checkpoint_files(model_dir: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint: `model.safetensors`, or the shards its index names."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        return tuple(model_dir / shard for shard in shards)
    single = model_dir / WEIGHTS_FILE
    if single.is_file():
        return (single,)
    raise NotFoundError(f"{model_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{index}: not valid JSON: {e}") from e
    except RecursionError:
        raise FormatError(f"{index}: nests JSON too deeply to be a shard index") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: missing or empty weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise FormatError(f"{index}: tensor {name!r} maps to {shard!r}, not a plain file name")
    return dict(weight_map)


def scan_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint by name, headers validated.

    With an index, every indexed tensor must be in the shard it names and every tensor of a shard in
    the index; a name in two files is an error.
    """
    model_dir = Path(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for file in checkpoint_files(model_dir):
        header = read_header(file)
        if header.metadata and header.metadata.get("format") not in PT_METADATA.values():
            raise FormatError(f"{file}: metadata format {header.metadata.get('format')!r} is not 'pt'")
        for name, info in header.tensors.items():
            if name in tensors:
                raise FormatError(f"tensor {name!r} is in both {tensors[name].file} and {file}")
            tensors[name] = info
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != shard:
                raise FormatError(f"{index}: tensor {name!r} is not in {shard}")
        if unlisted := sorted(set(tensors) - set(weight_map)):
            raise FormatError(f"{index}: tensor {unlisted[0]!r} is in a shard but not in the weight_map")
    return tensors


def check_dense(
    source: Mapping[str, TensorInfo], dense: Mapping[str, torch.Tensor], *, quantized: Collection[str] = ()
) -> None:
    """Refuse float replacements that would not fit the source: an unknown name, a shape that differs,
    a NaN/Inf, or the weight of a linear that is being quantized (its codes replace it)."""
    import torch

    for name, tensor in sorted(dense.items()):
        info = source.get(name)
        if info is None:
            raise ConfigError(f"replacement tensor {name!r} is not in the source checkpoint")
        if tuple(tensor.shape) != info.shape:
            raise ConfigError(
                f"replacement tensor {name!r} has shape {list(tensor.shape)}, the source {list(info.shape)}"
            )
        if name.removesuffix(".weight") in quantized:
            raise ConfigError(f"replacement tensor {name!r} belongs to a quantized linear")
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"replacement tensor {name!r} contains NaN or Inf")


def load_tensors(
    infos: Iterable[TensorInfo], dense: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Load the given tensors, opening each file once (memory-mapped by safetensors).

    A name in `dense` (already checked by `check_dense`) takes that value instead, cast to the
    stored dtype, so a writer copies the source except where a transform changed it.
    """
    from safetensors import SafetensorError, safe_open

    dense = dense or {}
    infos = list(infos)

    by_file: dict[Path, list[str]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info.name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise FormatError(f"{file}: cannot read tensors: {e}") from e
    for info in infos:
        if info.name in dense:
            out[info.name] = dense[info.name].to(device="cpu", dtype=out[info.name].dtype).contiguous()
    return out
