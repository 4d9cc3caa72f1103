"""Atomic files and directories, and the contract every format's writer and reader follows.

Why this exists: a packer can die at any instant (pre-emption, OOM, a full disk). Consumers and the
coordinator decide that an artifact exists by looking at its path, so nothing may ever appear at
that path until every byte of it is on disk. Files go through a temporary name + fsync + rename;
whole artifacts are written into a hidden sibling staging directory and renamed into place in one
step (`stage` → write → `publish`, or `discard` on failure).

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> staging = stage(root / "artifact")
>>> _ = write_file_atomic(staging / "hello.txt", b"hi")
>>> publish(staging, root / "artifact")
>>> sorted(p.name for p in (root / "artifact").iterdir())
['hello.txt']
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError

if TYPE_CHECKING:
    import torch

    from bitsmith.quantized import Quantized, QuantizedWeight
    from bitsmith.schemes import GPTQOptions

PARTIAL_MARKER = ".partial-"
"""Staging directories are named `.<name>.partial-<random>`: hidden, and obviously incomplete."""
OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How the safetensors library's writer ends the message of a write the OS refused."""
_DIGEST_READ_BYTES = 8 << 20


def read_json_object(path: Path, *, missing: str | None = None) -> dict[str, Any]:
    """Parse a file holding one JSON object; `FormatError` if it is malformed, and also if it is
    absent when `missing` (the message) is given — otherwise FileNotFoundError is the caller's."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        if missing is None:
            raise
        raise FormatError(missing) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return data


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(f: BufferedReader) -> str:
    """sha256 of an open file's bytes from its position to its end, read into one reused 8 MiB buffer
    (the reads and hashlib release the GIL, so files hash on several threads at once)."""
    digest = hashlib.sha256()
    buffer = bytearray(_DIGEST_READ_BYTES)
    view = memoryview(buffer)
    while read := f.readinto(buffer):
        digest.update(view[:read])
    return digest.hexdigest()


def _sha256_and_close(f: BufferedReader) -> str:
    with f:
        return sha256_of(f)


@dataclass(frozen=True, slots=True)
class _Hashed:
    """A file as it was when its hashing started: which inode, its size and mtime, and the digest to come."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    sha256: Future[str]


class WrittenFiles:
    """sha256 of the files the atomic writers below finish inside `hashing_written_files`, each hashed on a
    worker thread from the finished file while the writer goes on (its fsync, the next shard, the configs).

    Why: the manifest lists every file's sha256, and hashing an 8B model's 4 GB shard is about 3 s of one
    core; hashed after the whole write, each file's seconds add to the job's, hashed as soon as it is
    written they overlap what follows. The digest is still the plain sha256 of the file's bytes on disk,
    read back from the file itself, and it is only given for the very file that was hashed, unchanged:
    the same path, inode, size and mtime (the rename into place keeps them; a rewrite does not).
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._files: dict[Path, _Hashed] = {}
        self._lock = threading.Lock()

    def hash(self, written: Path, final: Path) -> None:
        """Start hashing the finished file `written`, which is renamed to `final` next (the file is opened
        here, so the rename cannot come between)."""
        f = open(written, "rb")  # noqa: SIM115 (closed by the worker that hashes it)
        stat = os.fstat(f.fileno())
        try:
            sha256 = self._pool.submit(_sha256_and_close, f)
        except BaseException:
            f.close()
            raise
        with self._lock:
            self._files[final.resolve()] = _Hashed(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, sha256)

    def sha256(self, path: Path) -> str | None:
        """The sha256 of the file now at `path` if it is one this hashed, unchanged since; None otherwise."""
        with self._lock:
            hashed = self._files.get(path.resolve())
        if hashed is None:
            return None
        stat = path.stat()
        if (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns) != (
            hashed.device, hashed.inode, hashed.size, hashed.mtime_ns
        ):
            return None
        return hashed.sha256.result()


_WRITTEN: ContextVar[WrittenFiles | None] = ContextVar("bitsmith_written_files", default=None)


@contextmanager
def hashing_written_files() -> Iterator[WrittenFiles]:
    """Hash every file that `atomic_file`, `save_safetensors_atomic` and `copy_file_synced` finish in this
    context (this thread) as soon as it is written (see `WrittenFiles`); the hashing threads are joined on exit."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bitsmith-file-sha256") as pool:
        written = WrittenFiles(pool)
        token = _WRITTEN.set(written)
        try:
            yield written
        finally:
            _WRITTEN.reset(token)


def _finished(written: Path, final: Path) -> None:
    """A writer below finished `written` (renamed to `final` next): hash it now where a context asks for it."""
    if (files := _WRITTEN.get()) is not None:
        files.hash(written, final)


def temp_sibling(path: Path) -> Path:
    """A hidden, unique name next to `path`, so that the final rename stays on one filesystem."""
    return path.with_name(f".{path.name}{PARTIAL_MARKER}{secrets.token_hex(6)}")


@contextmanager
def atomic_file(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write that appears at `path` whole when the block ends, or not at all if it raises.

    `durable` also fsyncs the file and its directory, so the new file survives a crash of the host;
    without it the rename alone keeps readers from ever seeing a partial file.
    """
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            _finished(tmp, path)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_file_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    with atomic_file(path) as f:
        f.write(data)
    return path


def save_safetensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """`safetensors.torch.save_file` through a temporary name, fsync and rename.

    The library's writer reports a refused write (a full disk) as a `SafetensorError` whose message
    ends in the OS error; it is raised again as the `OSError` it was, naming the file, so a full
    store reads as one to every caller.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = temp_sibling(path)
    try:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        except SafetensorError as exc:
            if code := OS_ERROR.search(str(exc)):
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
            raise
        _finished(tmp, path)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def copy_file_synced(src: Path, dst: Path) -> Path:
    """Copy a file's bytes (no metadata) and fsync the copy; used inside staging directories."""
    shutil.copyfile(src, dst)
    _finished(dst, dst)
    fsync_path(dst)
    return dst


def _is_nonempty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return any(True for _ in entries)


def _refuse_occupied(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise AlreadyExistsError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and _is_nonempty_dir(out_dir):
        raise AlreadyExistsError(f"output directory {out_dir} exists and is not empty")


def stage(out_dir: Path) -> Path:
    """Create and return a fresh staging directory beside `out_dir`.

    Refuses early (before any work is done) when `out_dir` is occupied (`AlreadyExistsError`) or its
    parent cannot be created or written (`ConfigError`).
    """
    out_dir = Path(out_dir)
    _refuse_occupied(out_dir)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the parent {parent} of output {out_dir}: {e}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"the parent {parent} of output {out_dir} is not writable")
    staging = temp_sibling(out_dir)
    try:
        staging.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot create staging directory {staging}: {e}") from e
    return staging


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def publish(staging: Path, out_dir: Path) -> None:
    """Move a finished staging directory to `out_dir` in one rename (an empty `out_dir` is replaced).

    Everything in the staging directory is fsynced first and the parent directory after, so after
    this returns the artifact survives a power loss, and before it returns nothing is at `out_dir`.
    """
    staging, out_dir = Path(staging), Path(out_dir)
    if not staging.is_dir():
        raise ConfigError(f"staging directory {staging} does not exist")
    _refuse_occupied(out_dir)
    _fsync_tree(staging)
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked above); rmdir fails rather than deleting anything that appeared
    try:
        os.rename(staging, out_dir)
    except OSError as e:
        raise AlreadyExistsError(f"cannot publish {staging} to {out_dir}: {e}") from e
    fsync_path(out_dir.parent)


def staging_dirs(out_dir: Path) -> list[Path]:
    """Every staging directory `stage(out_dir)` may have left beside `out_dir` (e.g. after a crash)."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.glob(f".{out_dir.name}{PARTIAL_MARKER}*") if p.is_dir())


def discard(staging: Path) -> None:
    """Remove a staging directory and everything in it; a missing one is fine (idempotent)."""
    staging = Path(staging)
    if PARTIAL_MARKER not in staging.name:
        raise ConfigError(f"refusing to discard {staging}: not a staging directory")
    if staging.exists():
        shutil.rmtree(staging)


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """`with staged(out) as tmp:` write into `tmp`; published on success, discarded on any error."""
    staging = stage(out_dir)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise
    publish(staging, out_dir)


def check_writer_inputs(
    out_dir: Path, quantized: Collection[str] | None = None, fmt: str = "", *, max_shard_bytes: int | None = None
) -> None:
    """What every writer checks first, before it reads the source: `out_dir` is an existing, empty (staging)
    directory (see `Writer`), and, where given, `max_shard_bytes` is positive and `quantized` names a layer.

    Why shared: a writer never creates or clears its output (`build_artifact` stages it), so an absent or
    occupied directory is the caller's bug and must read the same way for every format.
    """
    if not out_dir.is_dir():
        raise ConfigError(f"output directory {out_dir} does not exist (stage it first)")
    if any(out_dir.iterdir()):
        raise AlreadyExistsError(f"output directory {out_dir} is not empty")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if quantized is not None:
        require_layers(quantized, fmt)


def require_layers(quantized: Collection[str], fmt: str) -> None:
    """`ConfigError` if a `fmt` writer got no quantized layers (a checkpoint of float linears is no artifact)."""
    if not quantized:
        raise ConfigError(f"the {fmt} writer got no quantized layers")


def copy_present_files(source_dir: Path, out_dir: Path, names: Iterable[str]) -> None:
    """Copy each of `names` that `source_dir` has (tokenizer, generation config: what a consumer loads
    beside the weights) into `out_dir`, synced; a source without one simply has none to copy."""
    for name in names:
        if (source_dir / name).is_file():
            copy_file_synced(source_dir / name, out_dir / name)


class Writer(Protocol):
    """Writes one format INTO an existing, empty (staging) directory and returns it.

    `variant` selects a format's sub-layout (GPTQ: "gptq" v1 or "gptq_v2"); None is its default.
    `quantized` maps module names to solved weights (integer-grid formats take `QuantizedWeight`s only,
    through `integer_weights`); a block linear absent from it stays in float
    (the format records it as unquantized, or refuses). `dense` maps tensor names of the source to
    float values that replace the stored ones (AWQ folds its scales into norms and into linears kept
    in float); writers check it with `bitsmith.formats.safetensors_io.check_dense`.
    Writers never publish: `bitsmith.manifest.build_artifact` stages, calls the writer, writes the
    manifest and publishes, so every format gets atomicity and a manifest the same way.
    """

    def __call__(
        self,
        out_dir: Path,
        *,
        source_model_dir: Path,
        quantized: Mapping[str, Quantized],
        options: GPTQOptions,
        variant: str | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
    ) -> Path: ...


def integer_weights(quantized: Mapping[str, Quantized], fmt: str) -> dict[str, QuantizedWeight]:
    """The solved linears of an integer-grid format; `FormatError` naming any linear solved onto another
    grid (ggml blocks, which only GGUF stores; float8, which FP8 formats store)."""
    from bitsmith.quantized import QuantizedWeight

    out = {}
    for name, weight in quantized.items():
        if not isinstance(weight, QuantizedWeight):
            raise FormatError(f"{name} was solved onto the {weight.scheme.label} grid, which {fmt} cannot "
                              f"store; {fmt} needs an integer-grid solve")
        out[name] = weight
    return out


@runtime_checkable
class ForeignConfig(Protocol):
    """A checkpoint whose config.json is not an HF config (TensorRT-LLM's): it gives the HF one, which
    the dense model is built from."""

    def hf_config(self) -> dict[str, Any]: ...


def known_block_linears(config: Mapping[str, Any]) -> list[str] | None:
    """The decoder-block linears a checkpoint's config.json implies, when bitsmith knows its architecture
    (None otherwise); `FormatError` for a num_hidden_layers that is not a positive integer.

    Why readers want them: a float block linear the quantization config does not name as float is one
    that consumers would load expecting quantized tensors, and only a known architecture lists them all.
    """
    from bitsmith.models import get_adapter, supported_architectures

    model_type = config.get("model_type")
    if model_type not in supported_architectures():
        return None
    adapter = get_adapter(str(model_type))
    layers = config.get("num_hidden_layers")
    if type(layers) is not int or layers <= 0:
        raise FormatError(f"config.json: num_hidden_layers must be a positive integer, got {layers!r}")
    return [adapter.block_name(bid, local) for bid in range(layers) for local in adapter.linears]


class Dequantizes(Protocol):
    """A quantized linear as a reader returns it: it knows its float weight."""

    def dequantize(self, dtype: torch.dtype = ...) -> torch.Tensor: ...


def dense_state(
    tensors: Mapping[str, torch.Tensor], quantized: Mapping[str, Dequantizes], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF-named float state dict: the stored float tensors in `dtype`, and each quantized linear's `.weight`
    its dequantized weight (what every reader's `Checkpoint.dense_state_dict` gives)."""
    state = {name: t.to(dtype) for name, t in tensors.items()}
    state.update({f"{name}.weight": weight.dequantize(dtype) for name, weight in quantized.items()})
    return state


class Checkpoint(Protocol):
    """What every reader returns: enough to rebuild a float model for evaluation."""

    @property
    def config(self) -> Mapping[str, Any]: ...

    def dense_state_dict(self, dtype: torch.dtype = ...) -> dict[str, torch.Tensor]: ...


class Reader(Protocol):
    """Reads and validates an artifact directory; raises `FormatError` on anything malformed."""

    def __call__(self, path: Path) -> Checkpoint: ...
