"""Atomic staging and manifest.json: nothing half-written at out_dir; the manifest catches tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bitsmith import manifest
from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError
from bitsmith.formats.base import (
    copy_file_synced,
    discard,
    hashing_written_files,
    publish,
    save_safetensors_atomic,
    stage,
    write_file_atomic,
)
from bitsmith.manifest import (
    MANIFEST_FILE,
    build_artifact,
    files_digest,
    read_manifest,
    update_manifest,
    verify_manifest,
    write_manifest,
)
from bitsmith.schemes import Format


def _fill(directory: Path) -> None:
    write_file_atomic(directory / "model.safetensors", b"\x00" * 100)
    (directory / "sub").mkdir()
    write_file_atomic(directory / "sub" / "tokenizer.json", b"{}")


def _siblings(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir())


def test_manifest_lists_files_and_digest_is_sha256sum_of_them(tmp_path: Path) -> None:
    _fill(tmp_path)
    m = write_manifest(tmp_path, format=Format.GPTQ, recipe={"bits": 4}, trace_id="abc")
    assert [f.path for f in m.files] == ["model.safetensors", "sub/tokenizer.json"]
    assert m.files[0].bytes == 100
    import hashlib

    lines = "".join(f"{f.sha256}  {f.path}\n" for f in m.files)
    assert m.digest == hashlib.sha256(lines.encode()).hexdigest() == files_digest(m.files)
    assert {"bitsmith", "python", "torch", "transformers", "safetensors"} <= set(m.versions)
    on_disk = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert on_disk["format"] == "gptq" and on_disk["trace_id"] == "abc"
    assert read_manifest(tmp_path) == m


def test_update_metrics_keeps_identity(tmp_path: Path) -> None:
    _fill(tmp_path)
    m = write_manifest(tmp_path, format=Format.GPTQ, recipe={})
    updated = update_manifest(tmp_path, metrics={"ppl": 19.9})
    update_manifest(tmp_path, metrics={"kl": 0.01})
    again = verify_manifest(tmp_path)
    assert updated.digest == again.digest == m.digest
    assert again.metrics == {"ppl": 19.9, "kl": 0.01}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, "model.safetensors", "sub"]


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x01" * 100), "model.safetensors has sha256"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 99), "model.safetensors has 99 bytes"),
        (lambda d: (d / "sub" / "tokenizer.json").unlink(), "sub/tokenizer.json is in the manifest"),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin is not in the manifest"),
        (lambda d: (d / MANIFEST_FILE).write_text("{"), "not valid JSON"),
        (lambda d: (d / MANIFEST_FILE).unlink(), "no manifest.json"),
    ],
)
def test_verify_names_the_bad_file(tmp_path: Path, tamper, match: str) -> None:
    _fill(tmp_path)
    write_manifest(tmp_path, format=Format.GPTQ, recipe={})
    verify_manifest(tmp_path)
    tamper(tmp_path)
    with pytest.raises(FormatError, match=match):
        verify_manifest(tmp_path)


def test_a_wrong_size_is_reported_before_any_file_is_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes are checked first: a truncated shard of a large artifact is named without reading the rest."""
    _fill(tmp_path)
    write_manifest(tmp_path, format=Format.GPTQ, recipe={})
    (tmp_path / "sub" / "tokenizer.json").write_text("{ }")  # the last file in order, now a different size

    def no_hashing(paths: object) -> list[str]:
        raise AssertionError("hashed before the sizes were checked")

    monkeypatch.setattr(manifest, "files_sha256", no_hashing)
    with pytest.raises(FormatError, match=r"sub/tokenizer\.json has 3 bytes"):
        verify_manifest(tmp_path)


def test_stage_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        stage(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AlreadyExistsError, match="not a directory"):
        stage(tmp_path / "file")


def test_stage_refuses_an_uncreatable_parent(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the parent"):
        stage(tmp_path / "a-file" / "art")


def test_publish_replaces_an_empty_out_dir_and_refuses_a_filled_one(tmp_path: Path) -> None:
    out = tmp_path / "art"
    out.mkdir()
    staging = stage(out)
    assert staging.parent == tmp_path and staging.name.startswith(".art.partial-")
    _fill(staging)
    publish(staging, out)
    assert (out / "model.safetensors").stat().st_size == 100
    assert _siblings(out) == ["art"]
    second = stage(tmp_path / "other")
    with pytest.raises(AlreadyExistsError):
        publish(second, out)
    discard(second)
    assert _siblings(out) == ["art"]


def test_discard_refuses_a_directory_that_is_not_staging(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a staging directory"):
        discard(tmp_path)
    assert tmp_path.is_dir()


def test_a_writer_that_fails_midway_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "art"

    def broken_writer(directory: Path) -> None:
        _fill(directory)
        raise RuntimeError("disk full halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        build_artifact(out, broken_writer, format=Format.GPTQ, recipe={})
    assert not out.exists()
    assert _siblings(out) == []


def test_build_artifact_publishes_with_a_verified_manifest(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "art"
    m = build_artifact(out, _fill, format=Format.GPTQ, recipe={"method": "rtn"}, trace_id="t1")
    assert verify_manifest(out) == m
    assert m.recipe == {"method": "rtn"} and m.trace_id == "t1"
    assert _siblings(out) == ["art"]


def test_files_hashed_as_written_give_the_manifest_of_files_hashed_afterwards(tmp_path: Path) -> None:
    import torch

    def fill(directory: Path) -> None:
        _fill(directory)
        save_safetensors_atomic(directory / "weights.safetensors", {"w": torch.arange(10_000, dtype=torch.int32)})
        copy_file_synced(directory / "sub" / "tokenizer.json", directory / "copied.json")

    (plain := tmp_path / "plain").mkdir()
    (hashed := tmp_path / "hashed").mkdir()
    fill(plain)
    with hashing_written_files() as written:
        fill(hashed)
        assert written.sha256(hashed / "weights.safetensors") is not None
        m = write_manifest(hashed, format=Format.GPTQ, recipe={}, written=written)
    assert m.files == write_manifest(plain, format=Format.GPTQ, recipe={}).files
    assert verify_manifest(hashed).digest == m.digest


def test_a_file_changed_after_it_was_hashed_is_hashed_again(tmp_path: Path) -> None:
    with hashing_written_files() as written:
        write_file_atomic(tmp_path / "a.bin", b"old bytes")
        (tmp_path / "a.bin").write_bytes(b"new bytes, longer")  # rewritten in place, not atomically
        assert written.sha256(tmp_path / "a.bin") is None
        m = write_manifest(tmp_path, format=Format.GPTQ, recipe={}, written=written)
    assert m.files == write_manifest(tmp_path, format=Format.GPTQ, recipe={}).files
