"""`manifest.json`: what an artifact directory contains and how it was made.

Why: an artifact must be self-describing and checkable long after the job that wrote it is gone.
The manifest lists every file with its size and sha256, the recipe that produced it, metrics added by
evaluation, the job's diagnostics (per-layer errors, timeline: what `bitsmith report` draws), the
job's trace id and the versions of the libraries involved. Its `digest` (sha256 over
the sorted ``"<sha256>  <path>"`` lines, like ``sha256sum`` output) is the artifact's identity: it
depends only on the files, so adding metrics later does not change it.

>>> import tempfile
>>> from bitsmith.formats.base import write_file_atomic
>>> root = Path(tempfile.mkdtemp())
>>> _ = write_file_atomic(root / "a.txt", b"a")
>>> m = write_manifest(root, format=Format.GPTQ, recipe={"bits": 4})
>>> [f.path for f in m.files], verify_manifest(root).digest == m.digest
(['a.txt'], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import bitsmith
from bitsmith.errors import FormatError
from bitsmith.formats.base import (
    WrittenFiles,
    discard,
    hashing_written_files,
    publish,
    read_json_object,
    sha256_of,
    stage,
    write_file_atomic,
)
from bitsmith.schemes import Format

MANIFEST_FILE = "manifest.json"
VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "tokenizers")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    """One file of an artifact, by POSIX path relative to the artifact root."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The parsed `manifest.json` of an artifact."""

    VERSION = 1

    format: Format
    files: tuple[FileEntry, ...]
    digest: str
    recipe: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    """The job's `JobDiagnostics` in protobuf's JSON mapping (empty for artifacts built in-process)."""
    bits_per_weight: float = 0.0
    """Stored bits per weight of the linears the artifact quantizes (0: not recorded)."""
    trace_id: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": self.VERSION,
            "format": str(self.format),
            "digest": self.digest,
            "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in self.files],
            "recipe": dict(self.recipe),
            "metrics": dict(self.metrics),
            "diagnostics": dict(self.diagnostics),
            "bits_per_weight": self.bits_per_weight,
            "trace_id": self.trace_id,
            "versions": dict(self.versions),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = MANIFEST_FILE) -> Manifest:
        version = data.get("manifest_version")
        if version != cls.VERSION:
            raise FormatError(f"{where}: manifest_version {version!r} is not {cls.VERSION}")
        try:
            fmt = Format(data["format"])
            files = tuple(
                FileEntry(path=str(f["path"]), bytes=int(f["bytes"]), sha256=str(f["sha256"]))
                for f in data["files"]
            )
            return cls(
                format=fmt,
                files=files,
                digest=str(data["digest"]),
                recipe=dict(data.get("recipe", {})),
                metrics=dict(data.get("metrics", {})),
                diagnostics=dict(data.get("diagnostics", {})),
                bits_per_weight=float(data.get("bits_per_weight", 0.0)),
                trace_id=str(data.get("trace_id", "")),
                versions=dict(data.get("versions", {})),
                created_at=str(data.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def file_sha256(path: Path) -> str:
    """sha256 of a file, read piece by piece (artifacts can be tens of GB)."""
    with open(path, "rb") as f:
        return sha256_of(f)


def files_sha256(paths: Iterable[Path], written: WrittenFiles | None = None) -> list[str]:
    """sha256 of each file, in order: one file per worker thread (hashlib and reads release the GIL), so an
    artifact hashes in the time of its largest file rather than of all of them; a file that `written` already
    hashed (as the writer finished it) is not read again."""
    paths = list(paths)

    def sha256(path: Path) -> str:
        known = written.sha256(path) if written is not None else None
        return known if known is not None else file_sha256(path)

    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1)),
                            thread_name_prefix="bitsmith-manifest-sha256") as pool:
        return list(pool.map(sha256, paths))


def files_digest(files: tuple[FileEntry, ...]) -> str:
    """The artifact identity: sha256 over sorted ``"<sha256>  <path>\\n"`` lines."""
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of bitsmith, Python and the installed libraries that shape an artifact's bytes."""
    versions = {"bitsmith": bitsmith.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _list_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file under `directory` except the root manifest, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [*filenames, *dirnames]:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise FormatError(f"artifact {directory} contains a symlink: {full}")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def scan_files(directory: Path, written: WrittenFiles | None = None) -> tuple[FileEntry, ...]:
    """Size and sha256 of every file of an artifact directory (manifest.json excluded); `written`: see
    `files_sha256`."""
    directory = Path(directory)
    found = _list_files(directory)
    digests = files_sha256((directory / rel for rel in found), written)
    return tuple(
        FileEntry(path=rel, bytes=(directory / rel).stat().st_size, sha256=digest)
        for rel, digest in zip(found, digests, strict=True)
    )


def _write(directory: Path, manifest: Manifest) -> Manifest:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_file_atomic(Path(directory) / MANIFEST_FILE, text.encode())
    return manifest


def write_manifest(
    directory: Path,
    *,
    format: Format,
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    trace_id: str = "",
    created_at: str | None = None,
    written: WrittenFiles | None = None,
) -> Manifest:
    """Hash every file of `directory` and write its `manifest.json` (atomically); the files `written` hashed
    as they were written (`hashing_written_files` around the format's writer) are not read again."""
    files = scan_files(directory, written)
    manifest = Manifest(
        format=Format(format),
        files=files,
        digest=files_digest(files),
        recipe=dict(recipe),
        metrics=dict(metrics or {}),
        trace_id=trace_id,
        versions=library_versions(),
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return _write(directory, manifest)


def read_manifest(directory: Path) -> Manifest:
    """Parse `directory/manifest.json` (`FormatError` if missing or malformed)."""
    path = Path(directory) / MANIFEST_FILE
    data = read_json_object(path, missing=f"artifact {directory} has no {MANIFEST_FILE}")
    return Manifest.from_dict(data, where=str(path))


def verify_manifest(directory: Path) -> Manifest:
    """Recompute every size and hash; `FormatError` naming the first file that does not match.

    Missing files, files not listed in the manifest and a wrong digest are errors too, so a verified
    directory holds exactly what was published.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {f.path: f for f in manifest.files}
    present = set(_list_files(directory))
    if missing := sorted(set(listed) - present):
        raise FormatError(f"artifact {directory}: file {missing[0]} is in the manifest but missing")
    if extra := sorted(present - set(listed)):
        raise FormatError(f"artifact {directory}: file {extra[0]} is not in the manifest")
    ordered = sorted(listed.items())
    for rel, entry in ordered:  # every size before any hash: a truncated file is found without reading gigabytes
        size = (directory / rel).stat().st_size
        if size != entry.bytes:
            raise FormatError(f"artifact {directory}: {rel} has {size} bytes, manifest says {entry.bytes}")
    digests = files_sha256(directory / rel for rel, _ in ordered)
    for (rel, entry), digest in zip(ordered, digests, strict=True):
        if digest != entry.sha256:
            raise FormatError(
                f"artifact {directory}: {rel} has sha256 {digest}, manifest says {entry.sha256}"
            )
    if files_digest(manifest.files) != manifest.digest:
        raise FormatError(f"artifact {directory}: manifest digest does not match its file list")
    return manifest


def update_manifest(directory: Path, *, metrics: Mapping[str, Any], diagnostics: Mapping[str, Any] | None = None,
                    bits_per_weight: float | None = None) -> Manifest:
    """Merge `metrics` into the manifest and set `diagnostics` and `bits_per_weight` where given
    (atomic replace); files and digest are unchanged."""
    manifest = read_manifest(directory)
    return _write(directory, replace(
        manifest, metrics={**manifest.metrics, **metrics},
        diagnostics=manifest.diagnostics if diagnostics is None else dict(diagnostics),
        bits_per_weight=manifest.bits_per_weight if bits_per_weight is None else bits_per_weight,
    ))


def build_artifact(
    out_dir: Path,
    write: Callable[[Path], object],
    *,
    format: Format,
    recipe: Mapping[str, Any],
    trace_id: str = "",
) -> Manifest:
    """Stage, let `write(staging_dir)` fill it, write the manifest, publish; discard on any error.

    This is the one path by which the packer produces artifacts, so every format is atomic and
    carries a manifest without each writer re-implementing it.
    """
    staging = stage(out_dir)
    try:
        with hashing_written_files() as written:
            write(staging)
            manifest = write_manifest(staging, format=format, recipe=recipe, trace_id=trace_id, written=written)
    except BaseException:
        discard(staging)
        raise
    publish(staging, out_dir)
    return manifest
