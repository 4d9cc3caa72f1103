"""The artifact store: where tensors live while a job runs, addressed by `TensorRef`.

Why: tensors never travel inside gRPC messages or Ray closures. A calibrator writes Hessians here,
hands the solver `TensorRef`s; the solver writes `QuantizedWeight`s here and hands the packer
`QuantizedRef`s. A ref carries dtype, shape and a sha256 digest of the raw bytes, so a reader detects a
stale, truncated or swapped file instead of quantizing garbage.

The store is a directory tree of safetensors files addressed by store-relative keys
(``jobs/<job>/block-3/hessians.safetensors``). Keys are checked so that a key from the wire can
never name a file outside the root.

Digests are cheap in wall time without being weaker: a ref's `sha256` is `PIECED_SHA256` followed by
the sha256 of the concatenated sha256 digests of the bytes' consecutive `DIGEST_PIECE_BYTES` pieces,
which worker threads hash in parallel (hashlib releases the GIL), so a 0.8 GiB Hessian is hashed
by every core instead of one. Refs holding a plain sha256 of the whole bytes (older writers) are
still verified as such.

Writes cost one pass over the bytes: the file is written straight from each tensor's memory while
the workers hash the same memory, with no serialised copy in between. A job's scratch
(`durable=False`: Hessians, solved weights, anything under ``jobs/<id>/`` that dies with its job)
skips the fsyncs: the rename still makes a file appear whole or not at all, and a file an
operating-system crash truncates fails its digest at read. Without fsync a file that is deleted soon
after (a block's Hessians) may never reach the disk at all.

>>> import tempfile, torch
>>> store = ArtifactStore(Path(tempfile.mkdtemp()))
>>> refs = store.put_tensors("jobs/j1/h.safetensors", {"h": torch.eye(2)})
>>> refs["h"].shape
(2, 2)
>>> store.get_tensor(refs["h"]).sum().item()
2.0
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bitsmith.errors import ConfigError, FormatError, NotFoundError
from bitsmith.formats.base import atomic_file
from bitsmith.schemes import FP8Scheme, GGMLScheme, QuantScheme

if TYPE_CHECKING:
    import torch

    from bitsmith.quantized import Quantized

QUANTIZED_PARTS = ("codes", "scales", "zeros", "g_idx")
"""The tensors of a `QuantizedWeight`, stored as `<name>.<part>`."""


SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
"""torch dtype name -> safetensors dtype code, for the dtypes the store writes."""


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A host tensor's raw bytes in row-major order, as a view (no copy; the tensor must be contiguous)."""
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().data


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes in row-major order (dtype-agnostic, bf16 too)."""
    return hashlib.sha256(raw_bytes(tensor.detach().cpu().contiguous())).hexdigest()


DIGEST_PIECE_BYTES = 64 << 20
PIECED_SHA256 = f"sha256-pieces-{DIGEST_PIECE_BYTES >> 20}MiB:"
"""Prefix of the digest refs carry: see the module's docstring."""


@functools.cache
def _hashers() -> ThreadPoolExecutor:
    """The process's hashing threads, one per core, shared by every read and write."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bitsmith-sha256")


def _hash_pieces(data: memoryview) -> list[Future[bytes]]:
    """Start hashing `data`'s pieces; it must stay unchanged until `_pieced_digest` returns."""
    return [_hashers().submit(lambda piece: hashlib.sha256(piece).digest(), data[start:start + DIGEST_PIECE_BYTES])
            for start in range(0, len(data), DIGEST_PIECE_BYTES)]


def _pieced_digest(pieces: list[Future[bytes]]) -> str:
    return PIECED_SHA256 + hashlib.sha256(b"".join(piece.result() for piece in pieces)).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """The digest the store's refs carry for `tensor` (`PIECED_SHA256`), hashed on every core."""
    return _pieced_digest(_hash_pieces(raw_bytes(tensor.detach().cpu().contiguous())))


def dtype_name(dtype: torch.dtype) -> str:
    """The torch name of a dtype without the module prefix: ``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRef:
    """Where one tensor lives in the store and what it must look like when read back."""

    key: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizedRef:
    """A stored `QuantizedWeight`: refs to its four tensors plus its scheme."""

    codes: TensorRef
    scales: TensorRef
    zeros: TensorRef
    g_idx: TensorRef
    scheme: QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class GGMLRef:
    """A stored `GGMLWeight`: a ref to its block bytes plus its scheme and row length."""

    blocks: TensorRef
    scheme: GGMLScheme
    in_features: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FP8Ref:
    """A stored `FP8Weight`: refs to its float8 data, its scale and (static activations) input scale."""

    data: TensorRef
    scale: TensorRef
    input_scale: TensorRef | None
    scheme: FP8Scheme


StoredWeight = QuantizedRef | GGMLRef | FP8Ref
"""A solver's stored result, whatever grid it was solved on."""


MAX_KEY_BYTES = 1024
MAX_KEY_PART_BYTES = 255
"""NAME_MAX of common file systems; PATH_MAX is 4096, and the root's own path counts against it."""


def job_key(job_id: str, *parts: str) -> str:
    """The store key of a job's scratch (``jobs/<job_id>/...``); refuses ids that could leave it."""
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ConfigError(f"invalid job id {job_id!r}")
    return "/".join(("jobs", job_id, *parts))


class ArtifactStore:
    """A local directory of safetensors files addressed by relative keys."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, key: str) -> Path:
        """The path of `key`, refusing anything that could leave the root (`ConfigError`).

        Refused: empty keys, absolute keys, backslashes, empty / `.` / `..` parts, keys or parts longer
        than a file system takes (so a hostile key fails here, not as an OSError mid-write), and keys whose
        resolved path (following symlinks already in the tree, at any part) is outside the root.
        """
        if not key or key.startswith("/") or "\\" in key or "\0" in key:
            raise ConfigError(f"invalid store key {key!r}: must be a non-empty relative POSIX path")
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ConfigError(f"invalid store key {key[:64]!r}...: {len(key.encode())} bytes, over {MAX_KEY_BYTES}")
        parts = key.split("/")
        bad = [p for p in parts if p in ("", ".", "..")]
        if bad:
            raise ConfigError(f"invalid store key {key!r}: empty, '.' or '..' parts are not allowed")
        if long := [p for p in parts if len(p.encode()) > MAX_KEY_PART_BYTES]:
            raise ConfigError(f"invalid store key {key!r}: part {long[0][:64]!r}... is over {MAX_KEY_PART_BYTES} bytes")
        path = self.root.joinpath(*parts)
        try:
            real = path.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop planted in the tree
            raise ConfigError(f"store key {key!r} cannot be resolved: {exc}") from None
        if real != self.root and self.root not in real.parents:
            raise ConfigError(f"store key {key!r} resolves to {real}, outside the store root {self.root}")
        return path

    def put_tensors(self, key: str, tensors: Mapping[str, torch.Tensor], *, durable: bool = True
                    ) -> dict[str, TensorRef]:
        """Write `tensors` as one safetensors file at `key` (atomically) and return their refs.

        `durable=False` is for a job's scratch: no fsync (see the module's docstring)."""
        if not tensors:
            raise ConfigError(f"put_tensors({key!r}) got no tensors")
        path = self.resolve(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: _on_host(t) for name, t in tensors.items()}
        digests = _write_safetensors(path, contiguous, durable=durable)
        return {
            name: TensorRef(
                key=key,
                name=name,
                dtype=dtype_name(t.dtype),
                shape=tuple(int(d) for d in t.shape),
                sha256=digests[name],
            )
            for name, t in contiguous.items()
        }

    def get_tensor(self, ref: TensorRef) -> torch.Tensor:
        """Read one tensor, checking it against its ref."""
        return self.get_tensors([ref])[ref.name]

    def get_tensors(self, refs: Iterable[TensorRef]) -> dict[str, torch.Tensor]:
        """Read several tensors (one file open per key), keyed by tensor name; names must be unique."""
        by_key: dict[str, list[TensorRef]] = {}
        names: set[str] = set()
        for ref in refs:
            if ref.name in names:
                raise ConfigError(f"get_tensors: two refs share the tensor name {ref.name!r}")
            names.add(ref.name)
            by_key.setdefault(ref.key, []).append(ref)
        out: dict[str, torch.Tensor] = {}
        for key, key_refs in by_key.items():
            out.update(self._read_file(key, key_refs))
        return out

    def _read_file(self, key: str, refs: list[TensorRef]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        path = self.resolve(key)
        if not path.is_file():
            raise NotFoundError(f"store key {key!r} does not exist ({path})")
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                available = set(f.keys())
                for ref in refs:
                    if ref.name not in available:
                        raise NotFoundError(f"tensor {ref.name!r} is not in store key {key!r}")
                    out[ref.name] = _checked(f.get_tensor(ref.name), ref)
        except SafetensorError as e:
            raise FormatError(f"store key {key!r} is not a readable safetensors file: {e}") from e
        return out

    def delete_prefix(self, key: str) -> None:
        """Remove the file or directory tree at `key` (a job's scratch); missing is not an error."""
        path = self.resolve(key)
        if path == self.root:
            raise ConfigError("refusing to delete the whole store")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    def put_quantized(self, key: str, name: str, qw: Quantized, *, durable: bool = True
                      ) -> StoredWeight:
        """Store a solver's result; its tensors are named `<name>.codes`, `<name>.scales`, ...
        (`<name>.blocks` for a ggml-grid weight, `<name>.data` / `.scale` / `.input_scale` for a float8
        one); `durable` as in `put_tensors`."""
        from bitsmith.quantized import FP8Weight, GGMLWeight

        if isinstance(qw, GGMLWeight):
            blocks = self.put_tensors(key, {f"{name}.blocks": qw.data}, durable=durable)[f"{name}.blocks"]
            return GGMLRef(blocks=blocks, scheme=qw.scheme, in_features=qw.in_features)
        if isinstance(qw, FP8Weight):
            tensors = {f"{name}.data": qw.data, f"{name}.scale": qw.scale}
            if qw.input_scale is not None:
                tensors[f"{name}.input_scale"] = qw.input_scale
            refs = self.put_tensors(key, tensors, durable=durable)
            return FP8Ref(data=refs[f"{name}.data"], scale=refs[f"{name}.scale"],
                          input_scale=refs.get(f"{name}.input_scale"), scheme=qw.scheme)
        refs = self.put_tensors(key, {f"{name}.{part}": getattr(qw, part) for part in QUANTIZED_PARTS},
                                durable=durable)
        return QuantizedRef(
            codes=refs[f"{name}.codes"],
            scales=refs[f"{name}.scales"],
            zeros=refs[f"{name}.zeros"],
            g_idx=refs[f"{name}.g_idx"],
            scheme=qw.scheme,
        )

    def get_quantized(self, qref: StoredWeight) -> Quantized:
        """Load a stored solver result (verified against its refs)."""
        from bitsmith.quantized import FP8Weight, GGMLWeight, QuantizedWeight

        if isinstance(qref, GGMLRef):
            return GGMLWeight(data=self.get_tensor(qref.blocks), scheme=qref.scheme, in_features=qref.in_features)
        if isinstance(qref, FP8Ref):
            stored = self.get_tensors([qref.data, qref.scale, *([qref.input_scale] if qref.input_scale else [])])
            return FP8Weight(data=stored[qref.data.name], scale=stored[qref.scale.name], scheme=qref.scheme,
                             input_scale=stored[qref.input_scale.name] if qref.input_scale else None)
        parts = [getattr(qref, part) for part in QUANTIZED_PARTS]
        tensors = self.get_tensors(parts)
        return QuantizedWeight(
            codes=tensors[qref.codes.name],
            scales=tensors[qref.scales.name],
            zeros=tensors[qref.zeros.name],
            g_idx=tensors[qref.g_idx.name],
            scheme=qref.scheme,
        )


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` contiguous in host memory; from a GPU into page-locked memory (torch's caching host allocator
    reuses it), because a copy into fresh pageable memory crawls: 0.61 s for an 8B block's 1.1 GB of
    Hessians on an H100 host against 0.02 s pinned, the largest part of a Collect's store phase."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor.cpu().contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *, durable: bool) -> dict[str, str]:
    """Write contiguous host `tensors` as a safetensors file at `path` through a temporary name and a
    rename; each tensor's digest (`tensor_digest`) by name, hashed on worker threads while the file is
    written."""
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in tensors.items():
        code = SAFETENSORS_DTYPES.get(dtype_name(tensor.dtype))
        if code is None:
            raise ConfigError(f"the store cannot write tensor {name!r} of dtype {dtype_name(tensor.dtype)}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    views = {name: raw_bytes(tensor) for name, tensor in tensors.items()}
    hashing = {name: _hash_pieces(view) for name, view in views.items()}
    try:
        with atomic_file(path, durable=durable) as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for view in views.values():
                f.write(view)
    finally:  # the hashes read the tensors' memory: wait for them whatever happened
        digests = {name: _pieced_digest(pieces) for name, pieces in hashing.items()}
    return digests


def _checked(tensor: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    where = f"tensor {ref.name!r} in store key {ref.key!r}"
    if dtype_name(tensor.dtype) != ref.dtype:
        raise FormatError(f"{where} has dtype {dtype_name(tensor.dtype)}, ref says {ref.dtype}")
    if tuple(tensor.shape) != tuple(ref.shape):
        raise FormatError(f"{where} has shape {tuple(tensor.shape)}, ref says {tuple(ref.shape)}")
    digest = tensor_digest(tensor) if ref.sha256.startswith(PIECED_SHA256) else tensor_sha256(tensor)
    if digest != ref.sha256:
        raise FormatError(f"{where} has sha256 {digest}, ref says {ref.sha256} (stale or corrupt)")
    return tensor
