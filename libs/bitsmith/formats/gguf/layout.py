"""Byte-level validation of a GGUF file (FORMATS.md §5.1, checklist §8) before anything trusts it.

Why our own parser: llama.cpp aborts the whole process on many malformed files, and gguf-py's reader
allocates from counts it has not bounded (a hostile count makes it loop or allocate for minutes). This
walk reads every header field through one bounds-checked cursor, rejects a count before looping over
it when the bytes left cannot hold that many records, and checks what ggml's loader checks: magic,
version 3, value types (no nested arrays), unique non-empty keys, `general.alignment` a power of two,
unique tensor names, 1 to 4 dimensions each ≥ 1 with no int64 overflow, a known tensor type whose block
divides ne[0], offsets exactly Σ pad(nbytes, alignment) in record order, and data inside the file; and
every string, array elements included, valid UTF-8 (gguf-py decodes them all), and a block count
llama.cpp accepts. Every `FormatError` names the file, what is wrong and the byte offset.

>>> import tempfile
>>> bad = Path(tempfile.mkdtemp()) / "bad.gguf"
>>> _ = bad.write_bytes(b"GGUF" + (2).to_bytes(4, "little") + bytes(16))
>>> validate(bad)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
bitsmith.errors.FormatError: ...bad.gguf: GGUF version 2; only version 3 is supported at byte 4
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from bitsmith.errors import FormatError, NotFoundError
from bitsmith.formats.gguf.constants import DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NAME_BYTES, SUFFIX, VERSION

V = GGUFValueType
SCALAR_FORMATS = MappingProxyType({
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
})
"""Fixed-size value types and their little-endian struct formats (strings and arrays are variable)."""
STRING_MIN_BYTES = 8
"""An empty string is its 8-byte length; counts of strings are bounded by this."""
KV_MIN_BYTES = 8 + 1 + 4 + 1
"""Smallest KV record: key length, a 1-byte key, the value type, a 1-byte value."""
TENSOR_MIN_BYTES = 8 + 1 + 4 + 8 + 4 + 8
"""Smallest tensor record: name length, a 1-byte name, n_dims, one ne, type, offset."""
INT64_MAX = (1 << 63) - 1
MAX_LAYERS = 512
"""LLAMA_MAX_LAYERS: llama.cpp asserts (aborting the process) that `<arch>.block_count` is in [1, 512]."""
BLOCK_COUNT = Keys.LLM.BLOCK_COUNT.format(arch="")
"""The key's suffix (``.block_count``), whatever the architecture."""
KV_TYPES = MappingProxyType({
    Keys.General.ARCHITECTURE: (V.STRING, None), Keys.General.ALIGNMENT: (V.UINT32, None),
    Keys.General.FILE_TYPE: (V.UINT32, None), Keys.General.QUANTIZATION_VERSION: (V.UINT32, None),
    Keys.Tokenizer.MODEL: (V.STRING, None), Keys.Tokenizer.PRE: (V.STRING, None),
    Keys.Tokenizer.LIST: (V.ARRAY, V.STRING), Keys.Tokenizer.TOKEN_TYPE: (V.ARRAY, V.INT32),
    Keys.Tokenizer.SCORES: (V.ARRAY, V.FLOAT32), Keys.Tokenizer.MERGES: (V.ARRAY, V.STRING),
    Keys.Tokenizer.BOS_ID: (V.UINT32, None), Keys.Tokenizer.EOS_ID: (V.UINT32, None),
    Keys.Tokenizer.UNK_ID: (V.UINT32, None), Keys.Tokenizer.PAD_ID: (V.UINT32, None),
    Keys.Tokenizer.ADD_BOS: (V.BOOL, None), Keys.Tokenizer.ADD_EOS: (V.BOOL, None),
    Keys.Tokenizer.CHAT_TEMPLATE: (V.STRING, None),
})
"""Keys whose value type llama.cpp insists on (§5.3, §5.4): (type, array element type)."""
VOCAB_ARRAYS = (Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE, Keys.Tokenizer.SCORES)
"""Per-token arrays: all as long as the token list."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRecord:
    """One tensor-info record, checked: `ne` in ggml order (ne[0] contiguous), `offset` from the data section."""

    name: str
    ne: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy/PyTorch shape (ne reversed)."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """What `validate` proved about a file: its keys' value types, alignment, data start and tensors."""

    path: Path
    kv_types: Mapping[str, tuple[GGUFValueType, GGUFValueType | None]]
    array_lengths: Mapping[str, int]
    alignment: int
    data_offset: int
    tensors: tuple[TensorRecord, ...]


class _Cursor:
    """Bounds-checked little-endian reads over a memory-mapped file."""

    def __init__(self, path: Path, data: mmap.mmap | bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def fail(self, message: str, at: int | None = None) -> FormatError:
        return FormatError(f"{self.path}: {message} at byte {self.pos if at is None else at}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.left} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(chunk)

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.left} left")
        self.pos += n

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64(f"{what} length")
        if length > self.left:
            raise self.fail(f"{what} claims {length} bytes but {self.left} are left", start)
        try:
            return self.take(length, what).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason})", start) from None

    def count(self, what: str, min_bytes: int) -> int:
        """A record count, refused if the bytes left cannot hold that many records of `min_bytes`."""
        start = self.pos
        n = self.u64(what)
        if n > INT64_MAX or n * min_bytes > self.left:
            raise self.fail(f"{what} {n} cannot fit in the {self.left} bytes left", start)
        return n

    def value_type(self, what: str) -> GGUFValueType:
        start = self.pos
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} {raw} is not a GGUF value type", start) from None


Scalar = int | float | bool | str | None


def _skip_value(cur: _Cursor, key: str, vtype: GGUFValueType) -> tuple[GGUFValueType | None, int | None, Scalar]:
    """Step over one value; returns (array element type, array length, the scalar value or None)."""
    if vtype == V.STRING:
        return None, None, cur.string(f"value of {key!r}")
    if vtype != V.ARRAY:
        return None, None, cur.scalar(SCALAR_FORMATS[vtype], f"value of {key!r}")
    start = cur.pos
    element = cur.value_type(f"element type of {key!r}")
    if element == V.ARRAY:
        raise cur.fail(f"array {key!r} nests arrays, which ggml rejects", start)
    if element == V.STRING:
        n = cur.count(f"length of array {key!r}", STRING_MIN_BYTES)
        for i in range(n):
            cur.string(f"{key!r}[{i}]")  # decoded, not skipped: gguf-py decodes every element as UTF-8
    else:
        size = struct.calcsize(SCALAR_FORMATS[element])
        n = cur.count(f"length of array {key!r}", size)
        cur.skip(n * size, f"array {key!r}")
    return element, n, None


def _read_kvs(cur: _Cursor, n_kv: int) -> tuple[dict[str, tuple[V, V | None]], dict[str, int], int]:
    kv_types: dict[str, tuple[V, V | None]] = {}
    lengths: dict[str, int] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"key of KV {i}")
        if not key:
            raise cur.fail(f"KV {i} has an empty key", start)
        if key in kv_types:
            raise cur.fail(f"duplicate key {key!r}", start)
        vtype = cur.value_type(f"value type of {key!r}")
        element, length, value = _skip_value(cur, key, vtype)
        expected = KV_TYPES.get(key)
        if expected is not None and expected != (vtype, element):
            got = vtype.name + (f"[{element.name}]" if element is not None else "")
            raise cur.fail(f"key {key!r} is {got}, llama.cpp needs {expected[0].name}"
                           + (f"[{expected[1].name}]" if expected[1] is not None else ""), start)
        if key == Keys.General.ALIGNMENT:
            alignment = value if isinstance(value, int) else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two", start)
        if key.endswith(BLOCK_COUNT) and not (isinstance(value, int) and 1 <= value <= MAX_LAYERS):
            raise cur.fail(f"{key} {value!r} is outside llama.cpp's 1 to {MAX_LAYERS} blocks", start)
        kv_types[key] = (vtype, element)
        if length is not None:
            lengths[key] = length
    return kv_types, lengths, alignment


def _read_tensor(cur: _Cursor, index: int, names: set[str]) -> TensorRecord:
    start = cur.pos
    name = cur.string(f"name of tensor {index}")
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise cur.fail(f"tensor {index} name {name!r} is empty or longer than {MAX_NAME_BYTES} bytes", start)
    if name in names:
        raise cur.fail(f"duplicate tensor name {name!r}", start)
    names.add(name)
    n_dims = cur.u32(f"n_dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions, ggml allows 1 to {MAX_DIMS}", start)
    ne = tuple(int(cur.scalar("<q", f"ne[{j}] of {name!r}")) for j in range(n_dims))
    elements = 1
    for extent in ne:
        if extent < 1:
            raise cur.fail(f"tensor {name!r} has ne {list(ne)}; every dimension must be ≥ 1", start)
        elements *= extent
        if elements > INT64_MAX:
            raise cur.fail(f"tensor {name!r} with ne {list(ne)} overflows int64", start)
    raw_type = int(cur.scalar("<i", f"type of {name!r}"))
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}", start) from None
    if ne[0] % block:
        raise cur.fail(f"tensor {name!r} ({ggml_type.name}): ne[0] {ne[0]} is not a multiple of its block {block}",
                       start)
    offset = cur.u64(f"offset of {name!r}")
    return TensorRecord(name=name, ne=ne, type=ggml_type, offset=offset, nbytes=elements // block * type_size)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_data(cur: _Cursor, tensors: list[TensorRecord], alignment: int, size: int) -> int:
    data_offset = _pad(cur.pos, alignment)
    expected = 0
    for record in tensors:
        if record.offset != expected:
            raise cur.fail(f"tensor {record.name!r} has offset {record.offset}, expected {expected} "
                           f"(the padded sizes of the tensors before it)", data_offset + record.offset)
        expected += _pad(record.nbytes, alignment)
    end = data_offset + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if end > size:
        raise cur.fail(f"truncated: tensor data ends at byte {end} but the file has {size} bytes", size)
    if size > data_offset + expected:
        raise cur.fail(f"{size - data_offset - expected} bytes follow the last tensor's padding",
                       data_offset + expected)
    return data_offset


def _check_vocab(cur: _Cursor, lengths: Mapping[str, int]) -> None:
    n_tokens = lengths.get(Keys.Tokenizer.LIST)
    for key in VOCAB_ARRAYS[1:]:
        if n_tokens is not None and key in lengths and lengths[key] != n_tokens:
            raise cur.fail(f"{key} has {lengths[key]} entries for {n_tokens} tokens", 0)


def gguf_file(path: Path) -> Path:
    """The .gguf file of an artifact: `path` itself, or the one .gguf file in the directory `path`."""
    path = Path(path)
    if not path.is_dir():
        return path
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) != 1:
        raise FormatError(f"{path}: a GGUF artifact holds exactly one {SUFFIX} file, found {[f.name for f in files]}")
    return files[0]


def validate(path: Path) -> Layout:
    """Check a .gguf file (or the one in the artifact directory `path`) at the byte level, before llama.cpp
    or gguf-py sees it; `FormatError` naming the problem and its byte offset."""
    path = gguf_file(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise NotFoundError(f"GGUF file {path} does not exist") from e
    if size == 0:
        raise FormatError(f"{path}: empty file at byte 0")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _walk(_Cursor(path, data), size)


def _walk(cur: _Cursor, size: int) -> Layout:
    if cur.take(len(MAGIC), "magic") != MAGIC:
        raise cur.fail(f"not a GGUF file: magic {bytes(cur.data[:4])!r} is not {MAGIC!r}", 0)
    version = cur.u32("version")
    if version != VERSION:
        hint = " (a big-endian file?)" if version.to_bytes(4, "little") == VERSION.to_bytes(4, "big") else ""
        raise cur.fail(f"GGUF version {version}{hint}; only version {VERSION} is supported", 4)
    n_tensors = cur.count("tensor count", TENSOR_MIN_BYTES)
    n_kv = cur.count("KV count", KV_MIN_BYTES)
    kv_types, lengths, alignment = _read_kvs(cur, n_kv)
    _check_vocab(cur, lengths)
    names: set[str] = set()
    tensors = [_read_tensor(cur, i, names) for i in range(n_tensors)]
    data_offset = _check_data(cur, tensors, alignment, size)
    return Layout(path=cur.path, kv_types=kv_types, array_lengths=lengths, alignment=alignment,
                  data_offset=data_offset, tensors=tuple(tensors))
