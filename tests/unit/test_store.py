"""ArtifactStore: refs verify what they point at, keys cannot escape the root, writes are atomic."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from bitsmith import store as store_module
from bitsmith.errors import ConfigError, FormatError, NotFoundError
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme
from bitsmith.store import ArtifactStore, TensorRef, job_key, tensor_digest, tensor_sha256


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def test_put_get_round_trip_keeps_dtype_shape_and_bytes(store: ArtifactStore) -> None:
    tensors = {
        "h": torch.randn(8, 8),
        "bf": torch.randn(3, 5).to(torch.bfloat16),
        "codes": torch.randint(0, 16, (4, 32), dtype=torch.uint8),
        "scalar": torch.tensor(3, dtype=torch.int32),
    }
    refs = store.put_tensors("jobs/j1/block-0/stats.safetensors", tensors)
    assert refs["bf"].dtype == "bfloat16" and refs["bf"].shape == (3, 5)
    assert refs["scalar"].shape == ()
    back = store.get_tensors(refs.values())
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)
        assert refs[name].sha256 == tensor_digest(t)


def test_files_are_safetensors_that_the_library_reads_back_equal(store: ArtifactStore) -> None:
    from safetensors.torch import load_file

    tensors = {"h": torch.randn(5, 7, dtype=torch.float64), "bf": torch.randn(3).to(torch.bfloat16),
               "codes": torch.randint(0, 16, (4, 3), dtype=torch.uint8), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(7, dtype=torch.int64), "mask": torch.tensor([True, False])}
    store.put_tensors("jobs/j/x.safetensors", tensors)
    back = load_file(str(store.resolve("jobs/j/x.safetensors")))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_scratch_writes_skip_fsync_and_durable_ones_do_not(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    scratch = store.put_tensors("jobs/j/h.safetensors", {"h": torch.ones(3)}, durable=False)["h"]
    assert synced == [] and torch.equal(store.get_tensor(scratch), torch.ones(3))
    store.put_tensors("kept.safetensors", {"h": torch.ones(3)})
    assert len(synced) == 2  # the file, then its directory entry


def test_a_dtype_safetensors_cannot_hold_is_refused_by_name(store: ArtifactStore) -> None:
    with pytest.raises(ConfigError, match="'z' of dtype complex64"):
        store.put_tensors("jobs/j/z.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert not store.resolve("jobs/j").exists() or not any(store.resolve("jobs/j").iterdir())


def test_sha256_is_over_raw_bytes() -> None:
    import hashlib

    t = torch.arange(4, dtype=torch.int32)
    assert tensor_sha256(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert tensor_sha256(t) != tensor_sha256(t.to(torch.int64))


def test_digest_is_sha256_over_the_pieces_sha256s_and_catches_a_change_in_any_piece(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    monkeypatch.setattr(store_module, "DIGEST_PIECE_BYTES", 16)
    t = torch.arange(10, dtype=torch.float32)  # 40 bytes: pieces of 16, 16 and 8
    raw = t.numpy().tobytes()
    pieces = b"".join(hashlib.sha256(raw[i:i + 16]).digest() for i in (0, 16, 32))
    assert tensor_digest(t) == "sha256-pieces-64MiB:" + hashlib.sha256(pieces).hexdigest()
    ref = store.put_tensors("jobs/j/t.safetensors", {"t": t}, durable=False)["t"]
    assert ref.sha256 == tensor_digest(t)
    changed = t.clone()
    changed[-1] += 1  # the last piece only
    store.put_tensors("jobs/j/t.safetensors", {"t": changed}, durable=False)
    with pytest.raises(FormatError, match="stale or corrupt"):
        store.get_tensor(ref)


def test_a_ref_with_a_plain_sha256_is_still_verified(store: ArtifactStore) -> None:
    written = store.put_tensors("a.safetensors", {"x": torch.ones(4)})["x"]
    plain = TensorRef(key=written.key, name="x", dtype="float32", shape=(4,), sha256=tensor_sha256(torch.ones(4)))
    assert torch.equal(store.get_tensor(plain), torch.ones(4))
    with pytest.raises(FormatError, match="sha256"):
        store.get_tensor(dataclasses.replace(plain, sha256=tensor_sha256(torch.zeros(4))))


def test_stale_file_behind_a_ref_is_detected(store: ArtifactStore) -> None:
    ref = store.put_tensors("a.safetensors", {"x": torch.zeros(4)})["x"]
    store.put_tensors("a.safetensors", {"x": torch.ones(4)})  # overwritten by a later write
    with pytest.raises(FormatError, match="sha256"):
        store.get_tensor(ref)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"dtype": "float16"}, "dtype"), ({"shape": (2, 2)}, "shape"), ({"sha256": "0" * 64}, "sha256")],
)
def test_ref_mismatch_raises_format_error(store: ArtifactStore, change: dict, match: str) -> None:
    ref = store.put_tensors("a.safetensors", {"x": torch.zeros(4)})["x"]
    with pytest.raises(FormatError, match=match):
        store.get_tensor(dataclasses.replace(ref, **change))


def test_missing_key_or_tensor_is_not_found(store: ArtifactStore) -> None:
    ref = store.put_tensors("a.safetensors", {"x": torch.zeros(4)})["x"]
    with pytest.raises(NotFoundError):
        store.get_tensor(dataclasses.replace(ref, key="b.safetensors"))
    with pytest.raises(NotFoundError, match="'y'"):
        store.get_tensor(dataclasses.replace(ref, name="y"))


def test_truncated_file_is_format_error(store: ArtifactStore) -> None:
    ref = store.put_tensors("a.safetensors", {"x": torch.zeros(1000)})["x"]
    path = store.resolve("a.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FormatError, match=r"a\.safetensors"):
        store.get_tensor(ref)


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../outside", "a/../../b", "a//b", "a/./b", "a\\b", "a/"])
def test_keys_that_could_escape_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(ConfigError):
        store.resolve(key)
    with pytest.raises(ConfigError):
        store.put_tensors(key, {"x": torch.zeros(1)})


def test_symlink_out_of_the_store_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "link")
    with pytest.raises(ConfigError, match="outside the store root"):
        store.put_tensors("link/x.safetensors", {"x": torch.zeros(1)})
    assert not any(outside.iterdir())


def test_writes_leave_no_temporary_files(store: ArtifactStore) -> None:
    store.put_tensors("jobs/j/x.safetensors", {"x": torch.zeros(3)})
    assert sorted(p.name for p in (store.root / "jobs" / "j").iterdir()) == ["x.safetensors"]


def test_delete_prefix_removes_a_jobs_scratch_only(store: ArtifactStore) -> None:
    store.put_tensors("jobs/j1/b0.safetensors", {"x": torch.zeros(1)})
    kept = store.put_tensors("jobs/j2/b0.safetensors", {"x": torch.zeros(1)})["x"]
    store.delete_prefix("jobs/j1")
    store.delete_prefix("jobs/never-existed")
    assert not store.resolve("jobs/j1").exists()
    assert torch.equal(store.get_tensor(kept), torch.zeros(1))
    with pytest.raises(ConfigError):
        store.delete_prefix("jobs/..")


def test_quantized_weight_round_trip(store: ArtifactStore) -> None:
    scheme = QuantScheme(bits=3, group_size=32, sym=False, min_zero=1)
    qw = QuantizedWeight(
        codes=torch.randint(0, 8, (16, 64), dtype=torch.uint8),
        scales=torch.rand(16, 2),
        zeros=torch.randint(1, 8, (16, 2), dtype=torch.int32),
        g_idx=torch.arange(64, dtype=torch.int32) // 32,
        scheme=scheme,
    )
    qref = store.put_quantized("jobs/j/solve/q.safetensors", "model.layers.0.mlp.up_proj", qw)
    assert qref.codes.name == "model.layers.0.mlp.up_proj.codes"
    back = store.get_quantized(qref)
    assert back.scheme == scheme
    for part in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, part), getattr(qw, part))


def test_job_keys_stay_inside_the_jobs_prefix() -> None:
    assert job_key("abc", "block-1", "h.safetensors") == "jobs/abc/block-1/h.safetensors"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="invalid job id"):
            job_key(bad)
